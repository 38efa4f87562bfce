"""Faults lose nothing: periodic checkpoints, a SIGKILLed training process, a crash in the training
thread, and a loss that turns NaN.

The kill test runs a REAL `python -m core train` on the real FashionMNIST files (tiny network, T = 20,
2048 images), kills it with SIGKILL once it has checkpointed and logged, and resumes it with
`--resume`: the run must list as interrupted, load, keep its metrics, and continue from its last
checkpoint. Nothing here is mocked: the faults are real processes, real files and real divergence.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.store import io, runs
from core.work.jobs import TrainingJob
from core.train.training import TrainingDiverged, train_run
from tests.conftest import REPO, tiny_config

DATA_ROOT = Path(os.environ.get("DDPM_DATA_ROOT", REPO / "data"))


def _state_step(run: Path) -> int | None:
    try:
        return json.loads((run / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


# -- checkpoints at an interval, at epoch ends -----------------------------------------------------------
def test_checkpoints_come_at_the_interval_between_epoch_ends(tmp_path, tiny_images):
    """With checkpoint_every_s tiny, every step is checkpointed long before the epoch (8 steps) ends."""
    seen: list[tuple[int, int | None]] = []

    def watch(run: Path):
        def on_progress(progress) -> None:
            if progress.state == "running" and progress.message == "" and progress.step:
                seen.append((progress.step, _state_step(run)))
        return on_progress

    periodic = runs.create_run(tmp_path, "periodic", tiny_config(max_steps=6, log_every=1, checkpoint_every_s=1e-9))
    train_run(periodic, images=tiny_images, on_progress=watch(periodic))
    # Each progress report follows the metrics row of step k; the checkpoint of step k comes just after.
    assert seen == [(k, k - 1 if k > 1 else None) for k in range(1, 7)]

    seen.clear()
    off = runs.create_run(tmp_path, "off", tiny_config(max_steps=6, log_every=1, checkpoint_every_s=0.0))
    train_run(off, images=tiny_images, on_progress=watch(off))
    assert [state for _, state in seen] == [None] * 6  # no interval: nothing until the end
    assert _state_step(off) == 6  # ... where the final checkpoint is written

    seen.clear()
    epochs = runs.create_run(tmp_path, "epochs", tiny_config(max_steps=0, epochs=2, batch_size=64, log_every=1))
    train_run(epochs, images=tiny_images, on_progress=watch(epochs))
    # With no interval, the end of epoch 1 (step 4) is checkpointed, then the end of the run.
    assert [state for _, state in seen] == [None] * 4 + [4] * 4 and _state_step(epochs) == 8


# -- a real training process killed with SIGKILL, then resumed -------------------------------------------
KILL_EVERY_S = 1.0
PER_EPOCH = 2048 // 32


def _train_command(runs_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "core", "train", "--runs-dir", str(runs_dir), "--name", "live",
            "--data-root", str(DATA_ROOT), "--quiet", *flags]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.integration
@pytest.mark.slow
def test_sigkill_mid_run_loses_only_the_work_since_the_last_checkpoint(tmp_path):
    runs_dir = tmp_path / "runs"
    run = runs_dir / "live"
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(
        _train_command(runs_dir, "--model", "improved_unet", "--base-channels", "8", "--channel-mults", "1", "2",
                       "--attention", "off", "--optimizer", "adamw", "--lr", "2e-3", "--limit-images", "2048",
                       "--batch-size", "32", "--timesteps", "20", "--epochs", "1000", "--device", "cpu",
                       "--channels-last", "off", "--checkpoint-every", str(KILL_EVERY_S)),
        cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (_state_step(run) and len(runs.read_metrics(run)) >= 2):
            assert proc.poll() is None, (tmp_path / "train.log").read_text()
            assert time.monotonic() < deadline, "the training process never checkpointed"
            time.sleep(0.2)
        assert {i.name: i.state for i in runs.list_runs(runs_dir)} == {"live": "running"}
        # A second writer on a live run is refused, and changes nothing.
        config_before = (run / "config.json").read_bytes()
        second = subprocess.run(_train_command(runs_dir, "--resume", "--max-steps", "5"), cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "is still training" in second.stderr, second.stderr
        assert (run / "config.json").read_bytes() == config_before
        # Kill right after a timed checkpoint (--checkpoint-every) is the newest: on a loaded machine an
        # epoch end may have written the last one while the second writer was refused.
        while (_state_step(run) or 0) % PER_EPOCH == 0:
            assert proc.poll() is None, (tmp_path / "train.log").read_text()
            assert time.monotonic() < deadline + 300, "no timed checkpoint after an epoch end"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)  # reaped: its pid is gone, as after a real crash
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # The killed run lists as interrupted and opens at its last checkpoint.
    step = _state_step(run)
    assert step % PER_EPOCH != 0, "the checkpoint came from an epoch end, not from --checkpoint-every"
    assert runs.read_status(run)["state"] == "interrupted"
    assert {i.name: i.state for i in runs.list_runs(runs_dir)} == {"live": "interrupted"}
    assert io.weights_metadata(run / "model.safetensors")["step"] == str(step)
    runs.load_model(run)
    checkpoint_elapsed = json.loads((run / "state.json").read_text())["elapsed_s"]

    # metrics.csv is intact, even with a row torn by the kill at its end.
    before = runs.read_metrics(run)
    steps_before = [int(r["step"]) for r in before]
    assert steps_before == list(range(10, 10 * len(before) + 1, 10))
    with open(run / "metrics.csv", "a", encoding="utf-8") as fh:
        fh.write(f"{steps_before[-1] + 10},1,0.1")  # no newline: the kill cut the row short
    assert runs.read_metrics(run) == before
    # Rows after the checkpoint are the only work lost, and there is at most an interval of it.
    lost = [r for r in before if r["step"] > step]
    assert all(r["elapsed_s"] - checkpoint_elapsed < KILL_EVERY_S + 30 for r in lost)

    resumed = subprocess.run(_train_command(runs_dir, "--resume", "--max-steps", str(step + 20)), cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {step + 20}" in resumed.stdout
    after = runs.read_metrics(run)
    steps_after = [int(r["step"]) for r in after]
    assert steps_after == sorted(set(steps_after)), "duplicate or backwards steps after resume"
    kept = [r for r in before if r["step"] <= step]
    assert after[:len(kept)] == kept  # rows up to the checkpoint survive exactly
    new = after[len(kept):]
    assert new and new[0]["step"] > step and new[-1]["step"] == step + 20
    assert all(r["elapsed_s"] >= checkpoint_elapsed for r in new)  # the clock continues, not restarts
    assert runs.read_status(run)["state"] == "finished"
    assert _state_step(run) == step + 20
    # The optimizer continued too: Adam's step count runs on from the checkpoint, not from zero.
    optimizer_state = load_file(run / "optimizer.safetensors")
    assert int(optimizer_state["0.step"]) == step + 20


# -- a crash inside the training thread -----------------------------------------------------------------
def test_exception_in_the_training_thread_marks_the_run_failed(tmp_path, tiny_images):
    """A real I/O fault mid-run: the folder for sample grids is a file, so epoch 1's preview fails."""
    run = runs.create_run(tmp_path, "crash", tiny_config(max_steps=0, epochs=3, batch_size=64, log_every=1,
                                                         sample_every_epochs=1))
    (run / "samples").rmdir()
    (run / "samples").write_text("not a folder")
    job = TrainingJob(run, images=tiny_images).start()
    assert job.join(timeout=600)
    snapshot = job.snapshot()
    assert snapshot.state == "failed"
    assert snapshot.error.startswith("FileExistsError") and "samples" in snapshot.error
    assert job.traceback and "FileExistsError" in job.traceback
    status = runs.read_status(run)
    assert status["state"] == "failed" and status["error"] == snapshot.error
    listed = runs.list_runs(tmp_path)
    assert [(i.name, i.state, i.error) for i in listed] == [("crash", "failed", snapshot.error)]
    # The epoch-end checkpoint written just before the fault survives and loads.
    assert _state_step(run) == 4 and io.weights_metadata(run / "model.safetensors")["step"] == "4"
    runs.load_model(run)


# -- a loss that becomes NaN ----------------------------------------------------------------------------
def test_nan_loss_fails_the_run_and_names_the_cause(tmp_path, tiny_images):
    """AdamW with lr·wd = 10 multiplies the weights by -9 every step: they overflow within a few steps."""
    run = runs.create_run(tmp_path, "nan", tiny_config(optimizer="adamw", lr=1.0, weight_decay=10.0, max_steps=40,
                                                       epochs=10, log_every=1))
    with pytest.raises(TrainingDiverged) as info:
        train_run(run, images=tiny_images)
    message = str(info.value)
    assert "training diverged" in message and ("loss became nan" in message or "loss became inf" in message)
    assert "lr × weight_decay = 10 > 1" in message  # the cause, not just the symptom
    status = runs.read_status(run)
    assert status["state"] == "failed" and status["error"] == message
    rows = runs.read_metrics(run)
    assert all(r["loss"] == r["loss"] and r["loss"] != float("inf") for r in rows)  # no NaN row logged
    assert int(message.split(" at step ")[1].split(":")[0]) < 40  # it stopped, not ran out its steps
