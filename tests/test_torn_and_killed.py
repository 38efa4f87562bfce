"""Torn checkpoints, races, kills, signals and full disks lose nothing (issue 13, items 4-9).

Each fault is real: a checkpoint cut off by the kernel while the optimizer file is written
(RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with EFBIG where the old code left the
model at the new step and the optimizer at the old one), two resumes started together, SIGKILL before the first checkpoint, SIGINT and
SIGTERM, a 1 MB tmpfs that fills up (mounted in a user and mount namespace with `unshare`), and
AdamW blown up by lr x weight_decay = 10. Training runs are `python -m core train --preset tiny`
on the real FashionMNIST files, a few steps each.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.store import checkpoint, io, runs
from core.train import loop as training_loop
from core.work.jobs import JobManager
from core.models import build_model
from core.train.training import TrainingDiverged, train_run
from tests.conftest import REPO, make_tiny_images, tiny_config

DATA_ROOT = Path(os.environ.get("DDPM_DATA_ROOT", REPO / "data"))
pytestmark = pytest.mark.integration


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train_args(runs_dir: Path, name: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "core", "train", "--preset", "tiny", "--runs-dir", str(runs_dir), "--name", name,
            "--data-root", str(DATA_ROOT), "--quiet", *flags]


def resume_args(runs_dir: Path, name: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "core", "train", "--resume", "--runs-dir", str(runs_dir), "--name", name,
            "--data-root", str(DATA_ROOT), "--quiet", *flags]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, **kwargs)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the process ended before {what}: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def optimizer_step(run_dir: Path) -> int:
    return int(load_file(run_dir / "optimizer.safetensors")["0.step"])


# -- 4. a checkpoint killed mid-write is never combined with the one before ---------------------------
def test_a_checkpoint_cut_off_while_writing_the_optimizer_is_never_combined(tmp_path):
    runs_dir, name = tmp_path / "runs", "torn"
    run_dir = runs_dir / name
    first = run(train_args(runs_dir, name, "--max-steps", "4"))
    assert first.returncode == 0, first.stderr
    model_size = (run_dir / "model.safetensors").stat().st_size
    optimizer_size = (run_dir / "optimizer.safetensors").stat().st_size
    assert optimizer_size > model_size
    limit = (model_size + optimizer_size) // 2  # the model file fits, the optimizer file does not

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    # The kernel refuses the write (EFBIG) in the middle of the step-8 optimizer file.
    cut = run(resume_args(runs_dir, name, "--max-steps", "8"), preexec_fn=file_size_limit)
    assert cut.returncode != 0 and "File too large" in cut.stderr, cut.stderr

    resumed = run(resume_args(runs_dir, name, "--max-steps", "12"))
    assert resumed.returncode == 0, resumed.stderr
    assert "finished" in resumed.stdout and "step 12" in resumed.stdout
    # Adam counted every step once: the resume continued from the step-4 checkpoint as a whole.
    assert optimizer_step(run_dir) == 12
    assert io.weights_metadata(run_dir / "model.safetensors")["step"] == "12"
    rows = runs.read_metrics(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(2, 13, 2))
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed), f"the clock restarted: {elapsed}"
    assert no_temp_files(run_dir) == []  # the failed writer left no temporary file
    assert cut.stderr.startswith("error: disk full in ") and cut.returncode == 1  # one line, no traceback


# -- 5. one trainer per run: the lock decides ---------------------------------------------------------
def test_two_resumes_started_together_one_trains_one_is_refused(tmp_path):
    runs_dir, name = tmp_path / "runs", "race"
    first = run(train_args(runs_dir, name, "--max-steps", "2"))
    assert first.returncode == 0, first.stderr
    procs = [subprocess.Popen(resume_args(runs_dir, name, "--max-steps", "40"), cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err[-500:]) for p, _, err in results]
    loser = next(err for p, _, err in results if p.returncode == 2)
    assert loser.strip().count("\n") == 0 and loser.startswith(f"error: run '{name}' is still training (")
    assert optimizer_step(runs_dir / name) == 40  # the winner alone trained


def test_running_means_a_trainer_holds_the_lock(tmp_path):
    run_dir = runs.create_run(tmp_path, "held", tiny_config())
    # A stale status that names a live pid (1) with a fresh time is not "running": no one holds the lock.
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "pid": 1, "updated_at": time.time()}))
    assert runs.read_status(run_dir)["state"] == "interrupted"
    with runs.RunLock(run_dir):
        assert runs.read_status(run_dir)["state"] == "running"
        with pytest.raises(runs.RunBusy, match=r"^run 'held' is still training \(pid \d+\)"):
            JobManager().resume(run_dir, images=make_tiny_images())
        with pytest.raises(runs.RunBusy):
            train_run(run_dir, images=make_tiny_images())
        with pytest.raises(runs.RunBusy):
            runs.delete_run(tmp_path, "held")
    assert runs.read_status(run_dir)["state"] == "interrupted"  # the refused trainers changed nothing
    job = JobManager().resume(run_dir, images=make_tiny_images())
    assert job.join(timeout=600) and job.snapshot().state == "finished"
    runs.delete_run(tmp_path, "held")
    assert not run_dir.exists()


# -- 6. a run killed before its first checkpoint resumes from step 0 ---------------------------------
def _long_run(runs_dir: Path, name: str) -> subprocess.Popen:
    """A tiny run whose first epoch is 1875 steps: nothing ends it but a signal."""
    return subprocess.Popen(train_args(runs_dir, name, "--limit-images", "60000", "--max-steps", "100000"),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_before_its_first_checkpoint_is_interrupted_at_step_0(tmp_path):
    runs_dir, name = tmp_path / "runs", "early"
    run_dir = runs_dir / name
    proc = _long_run(runs_dir, name)
    try:
        wait_for(lambda: runs.read_metrics(run_dir), proc, "the first metrics row")
        assert not checkpoint.exists(run_dir)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    info = runs.run_info(run_dir)
    assert (info.state, info.step, info.readable, info.error) == ("interrupted", 0, True, None)
    assert info.state in runs.RESUMABLE_STATES  # the dashboard's Resume is enabled for it
    resumed = run(resume_args(runs_dir, name, "--max-steps", "4", "--limit-images", "512"))
    assert resumed.returncode == 2 and "--limit-images cannot change" in resumed.stderr
    resumed = run(resume_args(runs_dir, name, "--max-steps", "4"))
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.latest(run_dir, name).step == 4 and optimizer_step(run_dir) == 4


def test_the_first_checkpoint_comes_early(tmp_path, tiny_images, monkeypatch):
    """With no interval set and an epoch of 8 steps, the first checkpoint still comes at once when
    FIRST_CHECKPOINT_S has passed (0 here, 30 s in use); later ones wait for the epoch end."""
    monkeypatch.setattr(training_loop, "FIRST_CHECKPOINT_S", 0.0)
    run_dir = runs.create_run(tmp_path, "first", tiny_config(max_steps=6, log_every=1, checkpoint_every_s=0.0))
    seen = []

    def on_progress(progress) -> None:
        if progress.state == "running" and progress.message == "" and progress.step:
            summary = checkpoint.summary(run_dir, "first")
            seen.append(summary["step"] if summary else None)

    train_run(run_dir, images=tiny_images, on_progress=on_progress)
    assert seen == [None, 1, 1, 1, 1, 1]  # saved right after step 1, then only at the end (6)
    assert checkpoint.latest(run_dir, "first").step == 6


# -- 7. a full disk ends the run as failed, with its last complete checkpoint -------------------------
def test_a_full_disk_fails_the_run_and_keeps_the_last_checkpoint(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    command = " ".join(f"'{a}'" for a in train_args(mount / "runs", "full", "--max-steps", "48"))
    # One checkpoint of the tiny preset is ~0.5 MB: the first fits in 700 KB, the second cannot.
    script = (f"mount -t tmpfs -o size=700k none '{mount}' || exit 99\n"
              f"cd '{REPO}' && {command} >'{out}/stdout' 2>'{out}/stderr'; echo $? >'{out}/rc'\n"
              f"cp -a '{mount}/runs' '{out}/copy'\n")
    shell = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), capture_output=True, text=True,
                           timeout=600)
    if shell.returncode == 99 or not (out / "rc").exists():
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {shell.stderr[-300:]}")
    stderr = (out / "stderr").read_text()
    assert (out / "rc").read_text().strip() == "1", stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: disk full in {mount / 'runs' / 'full'} (No space left on device)")
    run_dir = out / "copy" / "full"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("disk full in ")
    assert no_temp_files(run_dir) == []
    saved = checkpoint.latest(run_dir, "full")
    assert saved.step == 16 and not saved.fallback  # the epoch-1 checkpoint, complete
    assert optimizer_step(run_dir) == 16 and io.weights_metadata(run_dir / "model.safetensors")["step"] == "16"
    runs.load_model(run_dir)


# -- 8. non-finite weights never reach a checkpoint, and are refused when sampled ---------------------
def test_nan_weights_never_overwrite_the_last_good_checkpoint(tmp_path, tiny_images):
    """AdamW with lr x wd = 10 blows up within a few steps; the loss is logged only every 1000 steps,
    but checked every step, and a checkpoint is attempted after every step."""
    run_dir = runs.create_run(tmp_path, "nan", tiny_config(optimizer="adamw", lr=1.0, weight_decay=10.0,
                                                           max_steps=40, epochs=10, log_every=1000,
                                                           checkpoint_every_s=1e-9))
    with pytest.raises(TrainingDiverged) as info:
        train_run(run_dir, images=tiny_images)
    message = str(info.value)
    assert "training diverged" in message and "lr × weight_decay = 10 > 1" in message
    assert int(message.split(" at step ")[1].split(":")[0]) < 40
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(run_dir / name).values()), name
    runs.load_model(run_dir)  # the last good checkpoint still samples


def test_sample_refuses_non_finite_weights(tmp_path, tiny_images):
    run_dir = runs.create_run(tmp_path / "runs", "black", tiny_config())
    train_run(run_dir, images=tiny_images)
    (run_dir / checkpoint.MANIFEST).unlink(missing_ok=True)  # as a run folder of the old format would hold them
    model = build_model(runs.load_config(run_dir).model)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    io.save_weights(run_dir / "model.safetensors", model, {"step": 6, "epoch": 0})
    result = run([sys.executable, "-m", "core", "sample", "--run", str(run_dir), "--device", "cpu", "--quiet",
                  "--n", "2", "--sampler", "ddim", "--steps", "2", "--out", str(tmp_path / "black.png")])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ("error: run 'black': model.safetensors holds non-finite weights (NaN or inf): "
                                     "the run diverged before it was saved; train it again with a lower learning rate")
    assert not (tmp_path / "black.png").exists()


# -- 9. Ctrl-C and SIGTERM stop like the Stop button ---------------------------------------------------
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signals_stop_the_run_gracefully(tmp_path, signum, code):
    runs_dir, name = tmp_path / "runs", "signalled"
    run_dir = runs_dir / name
    proc = _long_run(runs_dir, name)
    try:
        wait_for(lambda: len(runs.read_metrics(run_dir)) >= 2, proc, "two metrics rows")
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and stdout.startswith(f"stopped: {run_dir} step ")
    step = int(stdout.split(" step ")[1].split(",")[0])
    status = runs.read_status(run_dir)
    assert status["state"] == "stopped" and "error" not in status
    saved = checkpoint.latest(run_dir, name)
    assert saved.step == step >= 4 and optimizer_step(run_dir) == step
