"""Data-parallel training under torchrun (gloo, 2 CPU processes, tiny configs).

One DDP step equals one single-process step on the concatenated batch; a real 2-process torchrun
run writes one run folder (rank 0 alone), which lists, samples and resumes as a single process;
SIGKILLing one rank ends the job on the others with a clear error, the run shows as interrupted and
resumes under torchrun; bad input is refused on rank 0 in one line, exit 2 on every rank, nothing
written. Nothing is mocked: real processes, a real process group, real files.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from core.store import runs
from core.train.distributed import World
from core.train.training import Trainer
from tests.conftest import REPO, make_tiny_images, tiny_config

DATA_ROOT = Path(os.environ.get("DDPM_DATA_ROOT", REPO / "data"))
B = 8  # per-process batch of the equivalence test


# -- gradient equivalence --------------------------------------------------------------------------
def _same_inputs(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same 2B images, timesteps and noise on every process (seeded, not drawn by the trainer)."""
    gen = torch.Generator().manual_seed(7)
    x_0 = trainer.batch(make_tiny_images(2 * B, seed=3).images)
    timesteps = torch.randint(1, trainer.config.schedule.timesteps + 1, (2 * B,), generator=gen)
    noise = torch.randn(x_0.shape, generator=gen)
    return x_0, timesteps, noise


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights after the step, and the gradients the step used (DDP leaves the averaged ones)."""
    out = {f"w.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"g.{k}": p.grad.clone() for k, p in trainer.model.named_parameters()})
    return out


def _ddp_step(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: its own B of the 2B images through the product's Trainer, wrapped in DDP."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        trainer = Trainer(tiny_config(), torch.device("cpu"))
        assert isinstance(trainer.forward, torch.nn.parallel.DistributedDataParallel)
        x_0, timesteps, noise = _same_inputs(trainer)
        mine = slice(rank * B, (rank + 1) * B)
        trainer.train_step(x_0[mine], timesteps[mine], noise[mine])
        if rank == 0:
            save_file(_state(trainer), out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_take_the_step_one_process_takes_with_twice_the_batch(tmp_path):
    """ImprovedUNet with GroupNorm (per image, so no cross-batch statistics): 2 ranks × B give the
    gradients and weights of 1 process × 2B on the same images, timesteps and noise."""
    out = tmp_path / "ddp.safetensors"
    mp.spawn(_ddp_step, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = load_file(out)

    single = Trainer(tiny_config(), torch.device("cpu"), World())
    before = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.train_step(*_same_inputs(single))
    one = _state(single)
    assert set(one) == set(ddp)
    compared = total = 0
    for key in one:
        if key.startswith("g."):  # DDP averages the ranks' mean gradients: the mean over all 2B
            torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
            continue
        # AdamW's first step moves each weight by lr·g/(|g| + eps), ~lr·sign(g). A conv bias just
        # before a GroupNorm has a true gradient of 0 (the norm removes it), so its computed gradient
        # is float noise whose sign, and so its weight's move, is arbitrary on either side: those
        # entries are left out; every other weight must match.
        grad = one.get(f"g.{key[2:]}")
        settled = grad.abs() > 1e-6 if grad is not None else torch.ones_like(one[key], dtype=torch.bool)
        compared, total = compared + int(settled.sum()), total + settled.numel()
        torch.testing.assert_close(ddp[key][settled], one[key][settled], rtol=1e-4, atol=1e-5, msg=key)
    # Zero-initialised output layers leave the gradients of earlier ones at 0 on a first step: 44 % remain.
    assert compared > 0.3 * total
    moved = max((one[f"w.{k}"] - v).abs().max().item() for k, v in before.items())
    assert moved > 1e-3  # the step did something the comparison could miss


# -- torchrun, end to end --------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1"}


def _torchrun(runs_dir: Path, *flags: str, name: str = "ddp") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "core", "train", "--runs-dir", str(runs_dir), "--name", name, "--data-root", str(DATA_ROOT),
            "--quiet", *flags]


def _core(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _rank_exit_codes(text: str) -> list[int]:
    """The per-rank exit codes in torchrun's failure report (its own exit status is 1)."""
    return [int(code) for code in re.findall(r"^\s+exitcode\s+:\s+(-?\d+)", text, re.M)]


def _refused_on_every_rank(text: str) -> bool:
    """Both ranks ended with exit 2; except that torchrun stops the workers still running as soon as
    one has exited, so a rank a few milliseconds behind may show SIGTERM (-15) instead."""
    codes = _rank_exit_codes(text)
    return len(codes) == 2 and 2 in codes and set(codes) <= {2, -signal.SIGTERM}


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_writes_one_run_folder_that_lists_samples_and_resumes_as_one_process(tmp_path):
    runs_dir = tmp_path / "runs"
    done = subprocess.run(_torchrun(runs_dir, "--preset", "tiny", "--device", "cpu", "--max-steps", "6"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs_dir / "ddp"
    finished = [line for line in done.stdout.splitlines() if line.startswith("finished:")]
    assert len(finished) == 1 and "step 6" in finished[0] and "2 × cpu" in finished[0]  # rank 0 alone prints

    # Written once, by rank 0: one metrics row per logged step, rank 0's pid, no temporary files left.
    assert [int(r["step"]) for r in runs.read_metrics(run)] == [2, 4, 6]
    state = json.loads((run / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch_size"] == 2 * 32 and state["step"] == 6
    assert state["epoch_images"] == 6 * 64  # each step consumed one global batch of the permutation
    assert not [p.name for p in run.rglob(".*.tmp")]
    assert (run / "samples" / "final.png").is_file()

    listed = json.loads(_core("runs", "--runs-dir", str(runs_dir), "--json").stdout)
    assert [(r["name"], r["state"], r["step"]) for r in listed] == [("ddp", "finished", 6)]
    assert runs.run_info(run).meta["world_size"] == 2  # what the Runs page shows
    sampled = _core("sample", "--run", str(run), "--sampler", "ddim", "--steps", "4", "--n", "4", "--quiet",
                    "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr

    # A single process resumes it: the epoch position carries over in images, the optimizer in full.
    resumed = _core("train", "--runs-dir", str(runs_dir), "--name", "ddp", "--resume", "--max-steps", "10",
                    "--data-root", str(DATA_ROOT), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "step 10" in resumed.stdout
    assert [int(r["step"]) for r in runs.read_metrics(run)] == [2, 4, 6, 8, 10]
    state = json.loads((run / "state.json").read_text())
    assert state["world_size"] == 1 and state["epoch_images"] == 6 * 64 + 4 * 32
    assert int(load_file(run / "optimizer.safetensors")["0.step"]) == 10


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_killing_one_rank_ends_the_job_on_every_rank_and_the_run_resumes(tmp_path):
    runs_dir = tmp_path / "runs"
    run = runs_dir / "live"
    log = open(tmp_path / "job.log", "w+")
    job = subprocess.Popen(_torchrun(runs_dir, "--preset", "tiny", "--device", "cpu", "--epochs", "0",
                                     "--max-steps", "100000", "--checkpoint-every", "0.5", "--dist-timeout", "20",
                                     name="live"),
                           cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not ((run / "state.json").exists() and runs.read_metrics(run)):
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job never checkpointed"
            time.sleep(0.2)
        assert runs.read_status(run)["state"] == "running"

        rank0 = runs.read_status(run)["pid"]
        [rank1] = [pid for pid in _children(job.pid) if pid != rank0]
        os.kill(rank1, signal.SIGKILL)
        job.wait(timeout=60)  # well within the 20 s process-group timeout plus torchrun's grace period
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=60)
    log.seek(0)
    output = log.read()
    log.close()
    assert job.returncode != 0
    assert any(line.startswith("error: rank 0 of 2") for line in output.splitlines()), output[-3000:]
    status = runs.read_status(run)
    assert status["state"] == "interrupted"
    step = json.loads((run / "state.json").read_text())["step"]

    resumed = subprocess.run(_torchrun(runs_dir, "--resume", "--max-steps", str(step + 4), name="live"), cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {step + 4}" in resumed.stdout
    assert runs.read_status(run)["state"] == "finished"
    assert int(load_file(run / "optimizer.safetensors")["0.step"]) == step + 4
    steps = [int(r["step"]) for r in runs.read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == step + 4


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--preset", "tiny", "--device", "cpu", "--dist-backend", "nccl"],
     "dist_backend = 'nccl' is not allowed with device cpu"),
    (["--preset", "tiny", "--device", "cpu", "--limit-images", "64", "--batch-size", "40"],
     "batch_size = 40 per process × 2 processes = 80"),
    (["--resume", "--max-steps", "5"], "is still training"),
], ids=["nccl-on-cpu", "world-too-big-for-data", "resume-of-a-run-in-training"])
def test_bad_input_under_torchrun_is_one_line_exit_2_on_every_rank_nothing_written(tmp_path, flags, message):
    runs_dir = tmp_path / "runs"
    lock = None
    if "--resume" in flags:  # a run another job trains: this process holds its lock
        run = runs.create_run(runs_dir, "ddp", tiny_config())
        runs.write_status(run, "running", step=3)
        lock = runs.RunLock(run).acquire()
    before = {p: p.read_bytes() for p in runs_dir.rglob("*") if p.is_file()}
    done = subprocess.run(_torchrun(runs_dir, *flags), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    errors = _errors(done.stderr)
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert _refused_on_every_rank(done.stderr), done.stderr[-2000:]
    assert {p: p.read_bytes() for p in runs_dir.rglob("*") if p.is_file()} == before
    if lock is not None:
        lock.release()


@pytest.mark.slow
def test_bench_ddp_reports_the_scaling_of_two_processes_against_one():
    done = _core("bench", "--ddp", "2", "--smoke", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    ddp = json.loads(done.stdout)["ddp"]
    assert ddp["processes"] == 2 and ddp["backend"] == "gloo" and ddp["global_batch_size"] == 2 * ddp[
        "batch_size_per_process"]
    one, two = ddp["one_process"]["images_per_s"], ddp["n_processes"]["images_per_s"]
    assert one > 0 and two > 0
    assert ddp["scaling_efficiency"] == pytest.approx(two / (2 * one), rel=0.01)


# -- exact resume and the edges of a job (issue 21 items 5 and 6) ----------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_torchrun_stop_and_resume_gives_the_losses_of_a_job_that_never_stopped(tmp_path):
    """2 ranks, 12 steps straight against 6, stop, resume, 6 more: the same metrics.csv losses.
    Each rank draws its own t and ε; the resumed job must continue both streams and the data order
    (the old loop replayed the streams from step 0)."""
    runs_dir = tmp_path / "runs"
    flags = ("--preset", "tiny", "--device", "cpu", "--epochs", "0", "--limit-images", "512")
    for name, steps in (("straight", "12"), ("halves", "6")):
        done = subprocess.run(_torchrun(runs_dir, *flags, "--max-steps", steps, name=name), cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    resumed = subprocess.run(_torchrun(runs_dir, "--resume", "--max-steps", "12", name="halves"), cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = runs.read_metrics(runs_dir / "straight"), runs.read_metrics(runs_dir / "halves")
    assert [int(r["step"]) for r in got] == [int(r["step"]) for r in expected] == list(range(2, 13, 2))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in expected], dtype=torch.float64), rtol=1e-5, atol=1e-7)


def _load_with_rank1_unable_to_write(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """Both ranks load the training set from an empty data root; rank 1 cannot write a byte
    (RLIMIT_FSIZE 0, SIGXFSZ ignored, so a write fails with EFBIG) and gets there first, so
    it succeeds only if it waits for rank 0 instead of preparing the files itself."""
    import resource

    from core.config import DataConfig
    from core.train.data import load_training_images
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    os.chdir(out)  # no ./data here: the empty root is the only place with a chance
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        if rank == 1:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write raises EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))
        else:
            time.sleep(3)  # rank 1 reaches the data first: it must wait, not prepare the files itself
        images = load_training_images(DataConfig(dataset="fashion_mnist"), root, World(rank=rank, size=world_size))
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)  # the soft limit goes back up to write the result
        Path(out, f"rank{rank}").write_text(str(len(images)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist to prepare a data root from")
def test_only_rank_0_prepares_the_dataset_on_a_first_run(tmp_path):
    root, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    mp.spawn(_load_with_rank1_unable_to_write, args=(2, _free_port(), str(root), str(out)), nprocs=2, join=True)
    assert [(out / f"rank{r}").read_text() for r in (0, 1)] == ["60000", "60000"]
    assert not [p.name for p in root.rglob("*.tmp")]
    assert len(list((root / "FashionMNIST" / "raw").glob("*-ubyte"))) == 4  # prepared here, by rank 0


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_disk_on_rank_0_ends_every_rank_within_seconds(tmp_path):
    """Rank 0 alone writes, so a full disk (RLIMIT_FSIZE: the first checkpoint cannot be written)
    fails rank 0 alone; rank 1 must end within seconds of it, not at the 300 s process-group
    timeout, and with rank 0's reason rather than a broken connection."""
    import resource
    runs_dir = tmp_path / "runs"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))  # config.json fits, the weights do not
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    job = subprocess.Popen(_torchrun(runs_dir, "--preset", "tiny", "--device", "cpu", "--epochs", "0",
                                     "--max-steps", "100000", "--checkpoint-every", "1", name="full"),
                           cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           preexec_fn=small_files)
    try:
        deadline = time.monotonic() + 240
        while not ((runs_dir / "full" / "status.json").exists()
                   and runs.read_status(runs_dir / "full")["state"] == "failed"):
            assert job.poll() is None or time.monotonic() < deadline, "rank 0 never failed"
            if job.poll() is not None:
                break
            time.sleep(0.1)
        failed_at = time.monotonic()
        output, _ = job.communicate(timeout=60)  # a hung rank 1 would wait out the 300 s timeout
        assert time.monotonic() - failed_at < 60
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=60)
    assert job.returncode != 0
    status = runs.read_status(runs_dir / "full")
    assert status["state"] == "failed" and status["error"].startswith("disk full in "), status
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    # Rank 1 learnt rank 0's outcome at the checkpoint and ended with it (quietly: rank 0 alone
    # prints it), instead of finding the connection closed in its next all-reduce (the old loop).
    assert errors and errors[0].startswith("error: disk full in "), output[-3000:]
    assert not [line for line in errors if "network failed" in line], output[-3000:]
    codes = _rank_exit_codes(output)  # torchrun may stop a rank a few milliseconds behind: SIGTERM
    assert 1 in codes and set(codes) <= {1, -signal.SIGTERM}, output[-3000:]
