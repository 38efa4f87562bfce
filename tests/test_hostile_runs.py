"""Hostile run folders (issue 13): files planted by whoever shared a run folder must never take the
list, the dashboard or a command down, leak a file from outside the folder, or make the machine
allocate what it does not have.

Every case is a real file on disk: symlinks to /dev/zero and to a secret, a FIFO, JSON nested
100,000 levels, numbers out of range, a flipped byte in the weights, a config asking for 86 G
parameters. Commands run as real `python -m core` subprocesses under RLIMIT_AS (4 GB) and a
timeout, so a regression fails quickly (MemoryError, TimeoutExpired) instead of eating the machine.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import zipfile
import io as bytes_io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import save

from core.store import checkpoint, export, io, runs
from core.config import override
from core.work.jobs import JobManager
from core.train.training import train_run
from tests.conftest import REPO, make_tiny_images, tiny_config

MEMORY_LIMIT = 4 << 30
NESTED = "[" * 100_000 + "]" * 100_000


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def core(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_DATA_ROOT": str(REPO / "data")}
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_limited)


def core_many(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent commands two at a time (each pays for importing torch)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda args: core(*args), commands))


def one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0], f"{part!r} missing from {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, trained_tiny_run) -> Path:
    """A finished tiny run with EMA and one checkpoint (conftest's, trained once per session), the module's copy."""
    return shutil.copytree(trained_tiny_run, tmp_path_factory.mktemp("base") / "runs" / "tiny", symlinks=True)


@pytest.fixture(scope="module")
def base_two(tmp_path_factory, trained_runs) -> Path:
    """A tiny run checkpointed at every step: its newest checkpoint (6) has a previous one (5)."""
    trained = trained_runs(tiny_config(ema_decay=0.9, checkpoint_every_s=1e-9), "tiny2")
    return shutil.copytree(trained, tmp_path_factory.mktemp("base2") / "runs" / "tiny2", symlinks=True)


def copy_run(source: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(source, target, symlinks=True)
    (target / ".lock").unlink(missing_ok=True)
    return target


def as_legacy(run: Path) -> None:
    """The run folder as the workbench wrote it before manifests (the shipped demo runs' format)."""
    (run / checkpoint.MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(run / checkpoint.PREVIOUS, ignore_errors=True)


def reseal(run: Path) -> None:
    """Rewrite checkpoint.json for the files as they now are: what a hostile sharer can do too."""
    if not (run / checkpoint.MANIFEST).exists():
        return  # a run folder of the old format has nothing to reseal
    manifest = json.loads((run / checkpoint.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (run / name).read_bytes()
        manifest["files"][name] = {"sha256": io.sha256_hex(data), "size": len(data)}
    (run / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def write_legacy(run: Path, name: str, text: str) -> None:
    as_legacy(run)
    (run / name).unlink(missing_ok=True)
    (run / name).write_text(text)


def planted_symlink(name: str, target: str):
    def damage(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        os.symlink(target, run / name)
    return damage


def fifo(name: str):
    def damage(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        os.mkfifo(run / name)
    return damage


def nan_last_step(run: Path) -> None:
    as_legacy(run)
    (run / "state.json").unlink()
    with open(run / "metrics.csv", "a", encoding="utf-8") as fh:
        fh.write("nan,1,0.5,0.001,1.0,10.0\n")


# -- 1. every read is bounded and range-checked; damage stays with its run ---------------------------
# (id, damage, state the list shows, substring of the error it shows; None: no error)
LIST_CASES = [
    ("state-step-1e999", lambda run: write_legacy(run, "state.json", '{"step": 1e999}'),
     "damaged", "state.json is not valid JSON (the number 1e999 is out of range)"),
    ("manifest-step-1e999", lambda run: (run / "checkpoint.json").write_text('{"step": 1e999, "files": {}}'),
     "damaged", "checkpoint.json is not valid JSON (the number 1e999 is out of range)"),
    ("state-step-negative", lambda run: write_legacy(run, "state.json", '{"step": -3}'),
     "damaged", "state.json holds step = -3; it must be a whole number from 0 to"),
    ("metrics-last-step-nan", nan_last_step, "finished", None),
    ("status-nested", lambda run: (run / "status.json").write_text(NESTED), "damaged",
     "status.json is nested too deeply"),
    ("eval-nested", lambda run: (run / "eval.json").write_text(NESTED), "damaged", "eval.json is nested too deeply"),
    ("state-nested", lambda run: write_legacy(run, "state.json", NESTED), "damaged",
     "state.json is nested too deeply"),
    ("config-nested", lambda run: (run / "config.json").write_text(NESTED), "damaged",
     "config.json is nested too deeply"),
    ("status-dev-zero", planted_symlink("status.json", "/dev/zero"), "damaged", "status.json is a symbolic link"),
    ("eval-dev-zero", planted_symlink("eval.json", "/dev/zero"), "damaged", "eval.json is a symbolic link"),
    ("metrics-dev-zero", planted_symlink("metrics.csv", "/dev/zero"), "damaged", "metrics.csv is a symbolic link"),
    ("status-fifo", fifo("status.json"), "damaged", "status.json is not a regular file"),
    ("status-huge", lambda run: (run / "status.json").write_text(" " * (2 << 20) + "{}"), "damaged",
     "status.json holds 2,097,154 bytes, over the 1,048,576"),
    # The hostile runs of the other items, as the list sees them (each item's own test covers the rest).
    ("giant-config", lambda run: edit_config(run, "model", base_channels=512, channel_mults=[16, 16, 16],
                                             num_res_blocks=8), "finished", None),
    ("metrics-to-a-secret", planted_symlink("metrics.csv", "/etc/passwd"), "damaged", "metrics.csv is a symbolic link"),
    ("stale-pid-1", lambda run: stale_running(run), "interrupted", None),
    ("killed-before-checkpoint", lambda run: killed_before_checkpoint(run), "interrupted", None),
    # Issue 23 (Q1): the list verifies the newest checkpoint, so a flipped byte with no intact previous/
    # shows as damaged instead of "finished" at a step nothing can load.
    ("flipped-byte", lambda run: _flip_a_tensor_byte(run / "model.safetensors"), "damaged",
     "model.safetensors is damaged or truncated"),
    ("eval-not-entries", lambda run: (run / "eval.json").write_text("[1, 2]"), "damaged",
     "eval.json entry 0 is not an object"),
]


def edit_config(run: Path, section: str, **changes) -> None:
    config = json.loads((run / "config.json").read_text())
    config[section].update(changes)
    (run / "config.json").write_text(json.dumps(config))


def stale_running(run: Path) -> None:
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": 1, "updated_at": 4e9}))


def killed_before_checkpoint(run: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "checkpoint.json", "state.json"):
        (run / name).unlink(missing_ok=True)
    stale_running(run)


@pytest.fixture(scope="module")
def hostile_zoo(base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo") / "runs"
    root.mkdir()
    copy_run(base, root, "healthy-a")
    copy_run(base, root, "healthy-b")
    for case_id, damage, _, _ in LIST_CASES:
        damage(copy_run(base, root, case_id))
    os.symlink(copy_run(base, root.parent, "outside"), root / "symlinked-run")  # not a run: never listed
    return root


def test_every_hostile_file_is_confined_to_its_run(hostile_zoo):
    listed = {info.name: info for info in runs.list_runs(hostile_zoo)}
    assert set(listed) == {"healthy-a", "healthy-b"} | {c[0] for c in LIST_CASES}
    for name in ("healthy-a", "healthy-b"):
        assert listed[name].state == "finished" and listed[name].error is None and listed[name].step == 6
    for case_id, _, state, reason in LIST_CASES:
        info = listed[case_id]
        assert info.state == state, (case_id, info.state, info.error)
        if reason is None:
            assert info.error is None, (case_id, info.error)
        else:
            assert info.error.startswith(f"run '{case_id}': ") and reason in info.error, (case_id, info.error)
            assert "\n" not in info.error
    assert listed["metrics-last-step-nan"].step == 0  # no state.json, the nan row skipped
    assert listed["killed-before-checkpoint"].step == 0 and listed["killed-before-checkpoint"].readable


def test_cli_runs_lists_the_healthy_runs_beside_the_hostile_ones(hostile_zoo):
    listing = core("runs", "--runs-dir", str(hostile_zoo), "--json", timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows["healthy-a"]["state"] == rows["healthy-b"]["state"] == "finished"
    assert set(rows) == {"healthy-a", "healthy-b"} | {case_id for case_id, *_ in LIST_CASES}
    text = core("runs", "--runs-dir", str(hostile_zoo), timeout=120)
    assert text.returncode == 0 and "damaged: " not in text.stderr
    assert "status.json is not a regular file" in text.stdout


# -- 2. memory: what cannot fit is refused before anything is allocated -------------------------------
GIANT = ["--model", "improved_unet", "--base-channels", "512", "--channel-mults", "16", "16", "16",
         "--num-res-blocks", "8"]


def test_a_config_that_cannot_fit_is_refused_before_anything_exists(tmp_path):
    giant, wide = core_many(
        ["train", *GIANT, "--runs-dir", str(tmp_path / "runs"), "--name", "giant", "--device", "cpu"],
        ["train", "--batch-size", "60000", "--runs-dir", str(tmp_path / "runs"), "--name", "wide", "--device", "cpu"])
    one_line_error(giant, "86,344,657,921 parameters, over the limit of 500,000,000")
    one_line_error(wide, "batch_size = 60000 is not allowed: to train, it needs about", "use batch_size")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_shared_run_asking_for_too_much_is_refused_on_load(base, tmp_path):
    big = copy_run(base, tmp_path, "big")
    config = json.loads((big / "config.json").read_text())
    config["model"].update(base_channels=512, channel_mults=[16, 16, 16], num_res_blocks=8)
    (big / "config.json").write_text(json.dumps(config))
    with pytest.raises(runs.RunError, match=r"^run 'big': model = .* parameters, over the limit"):
        runs.load_model(big)
    sampled = core("sample", "--run", str(big), "--device", "cpu", "--quiet", "--n", "2", "--sampler", "ddim",
                   "--steps", "2", "--out", str(tmp_path / "big.png"))
    one_line_error(sampled, "run 'big': model = improved_unet", "over the limit of 500,000,000")

    wide = copy_run(base, tmp_path, "wide")
    config = json.loads((wide / "config.json").read_text())
    config["train"].update(batch_size=60000, limit_images=0)
    (wide / "config.json").write_text(json.dumps(config))
    resumed = core("train", "--resume", "--name", "wide", "--runs-dir", str(tmp_path), "--max-steps", "8",
                   "--quiet")
    one_line_error(resumed, "batch_size = 60000 is not allowed")
    assert runs.read_status(wide)["state"] == "finished"  # refused before it touched the run
    with pytest.raises(Exception, match="batch_size = 60000 is not allowed"):
        JobManager().resume(wide, images=make_tiny_images())


# -- 3. nothing is read or written through a symlink out of the run folder ---------------------------
def test_bundle_holds_only_regular_files_inside_the_run(base, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("api-key=hunter2")
    run = copy_run(base, tmp_path, "shared")
    (run / "metrics.csv").unlink()
    os.symlink(secret, run / "metrics.csv")
    os.symlink("/etc/passwd", run / "samples" / "epoch_999.png")
    with zipfile.ZipFile(bytes_io.BytesIO(export.run_bundle(run))) as zf:
        names = set(zf.namelist())
        contents = b"".join(zf.read(n) for n in names)
    assert "shared/model.safetensors" in names and "shared/config.json" in names
    assert "shared/metrics.csv" not in names and "shared/samples/epoch_999.png" not in names
    assert b"hunter2" not in contents and b"root:" not in contents


def test_a_symlinked_run_folder_is_not_a_run(base, tmp_path):
    outside = copy_run(base, tmp_path, "elsewhere")
    before = {p.name: p.stat().st_mtime_ns for p in outside.iterdir()}
    root = tmp_path / "runs"
    root.mkdir()
    copy_run(base, root, "real")
    os.symlink(outside, root / "link")
    assert [i.name for i in runs.list_runs(root)] == ["real"]
    with pytest.raises(runs.RunError, match="not a run folder"):
        JobManager().resume(root / "link", images=make_tiny_images())
    with pytest.raises(runs.RunError):
        export.run_bundle(root / "link")
    assert {p.name: p.stat().st_mtime_ns for p in outside.iterdir()} == before  # nothing rewritten there


def test_training_never_writes_through_planted_folder_links(base_two, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "runs").mkdir()
    run = copy_run(base_two, tmp_path / "runs", "planted")
    for folder in ("samples", checkpoint.PREVIOUS):
        shutil.rmtree(run / folder)
        os.symlink(outside, run / folder)
    (run / "config.json").write_text(override(runs.load_config(run), max_steps=8).to_json())
    train_run(run, resume=True, images=make_tiny_images())
    assert list(outside.iterdir()) == []  # grids and the previous checkpoint went into real folders
    assert checkpoint.latest(run, "planted").step == 8 and (run / "samples" / "final.png").is_file()


# -- 10. output paths are checked before any work, and the real path is printed ----------------------
def test_sample_output_paths_are_checked_first(base, tmp_path):
    out_dir = tmp_path / "existing"
    out_dir.mkdir()
    run = str(base)
    common = ["--run", run, "--device", "cpu", "--quiet", "--n", "2", "--sampler", "ddim", "--steps", "2"]
    into_folder, frames_folder = core_many(["sample", *common, "--out", str(out_dir)],
                                           ["sample", *common, "--out", str(tmp_path / "g.png"), "--frames", str(out_dir)])
    one_line_error(into_folder, f"--out = '{out_dir}' is not allowed: it is a folder")
    assert list(out_dir.iterdir()) == []  # no .existing.PID.tmp left behind
    one_line_error(frames_folder, "--frames", "it is a folder")
    assert not (tmp_path / "g.png").exists()  # refused before sampling, so nothing was written
    done = core("sample", *common, "--out", str(tmp_path / "g.png"), "--npy", str(tmp_path / "bad"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"-> {tmp_path / 'g.png'}, {tmp_path / 'bad.npy'}")
    assert (tmp_path / "bad.npy").is_file() and not (tmp_path / "bad").exists()


def test_runs_dir_and_name_must_be_real(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    listing, training, empty_dir, empty_name = core_many(
        ["runs", "--runs-dir", str(afile)], ["train", "--preset", "tiny", "--runs-dir", str(afile), "--name", "x"],
        ["runs", "--runs-dir", ""], ["train", "--preset", "tiny", "--runs-dir", str(tmp_path / "r"), "--name", ""])
    one_line_error(listing, "--runs-dir", "it is a file, not a folder")
    one_line_error(training, "it is a file, not a folder")
    one_line_error(empty_dir, "--runs-dir = '' is not allowed")
    one_line_error(empty_name, "name = '' is not allowed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# -- 11. integrity: the manifest's sha256 catches a flipped byte -------------------------------------
def _flip_a_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x40  # inside the tensor data, the header intact
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_weights_is_caught(base, tmp_path):
    run = copy_run(base, tmp_path, "flipped")
    _flip_a_tensor_byte(run / "ema.safetensors")
    with pytest.raises(runs.RunError, match=r"^run 'flipped': ema.safetensors is damaged or truncated "
                                            r"\(its sha256 does not match the step-6 checkpoint.json\)"):
        runs.load_model(run)
    sampled = core("sample", "--run", str(run), "--device", "cpu", "--quiet", "--n", "2", "--sampler", "ddim",
                   "--steps", "2", "--out", str(tmp_path / "f.png"))
    one_line_error(sampled, "ema.safetensors is damaged or truncated (its sha256 does not match")


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(base_two, tmp_path):
    run = copy_run(base_two, tmp_path, "two")
    assert checkpoint.latest(run, "two").step == 6
    _flip_a_tensor_byte(run / "model.safetensors")
    found = checkpoint.latest(run, "two")
    assert found.step == 5 and found.fallback
    assert runs.load_model(run, use_ema=False).config.schedule.timesteps == 20


# -- 12. report and resume: wrong shapes are one-line errors -----------------------------------------
def test_report_on_an_eval_json_that_is_not_entries(base, tmp_path):
    run = copy_run(base, tmp_path, "evals")
    (run / "eval.json").write_text("[1, 2]")
    result = core("report", "--runs", str(run), "--out", str(tmp_path / "docs"))
    one_line_error(result, "run 'evals': eval.json entry 0 is not an object")


def _rewrite_optimizer(run: Path, edit) -> None:
    data = (run / "optimizer.safetensors").read_bytes()
    meta = io.safetensors_metadata(data)
    tensors = io.parse_safetensors(data, "optimizer.safetensors", run.name)
    edit(meta, tensors)
    (run / "optimizer.safetensors").write_bytes(save(tensors, metadata=meta))
    reseal(run)


def _drop_betas(meta, tensors) -> None:
    groups = json.loads(meta["param_groups"])
    for group in groups:
        group.pop("betas")
    meta["param_groups"] = json.dumps(groups)


def _wrong_moment_shape(meta, tensors) -> None:
    tensors["0.exp_avg"] = tensors["0.exp_avg"].flatten()[:3].clone()


@pytest.mark.integration
@pytest.mark.parametrize("edit, reason", [(_drop_betas, "a parameter group misses 'betas'"),
                                          (_wrong_moment_shape, "0.exp_avg has shape (3,)")],
                         ids=["group-without-betas", "moment-of-wrong-shape"])
def test_optimizer_state_of_the_wrong_shape_is_one_line(base, tmp_path, edit, reason):
    run = copy_run(base, tmp_path, "opt")
    _rewrite_optimizer(run, edit)
    resumed = core("train", "--resume", "--name", "opt", "--runs-dir", str(tmp_path), "--max-steps", "8",
                   "--quiet")
    one_line_error(resumed, "run 'opt': optimizer.safetensors does not fit this optimizer", reason)
