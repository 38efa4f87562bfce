"""Training on tiny data: the run folder contract, resume, stop, EMA, divergence, the background job."""
from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from core.store import io, runs
from core.config import FORMAT_VERSION, ConfigError
from core.work.jobs import TrainingJob
from core.train.training import TrainingDiverged, train_run
from tests.conftest import make_tiny_images, tiny_config


def test_run_folder_holds_the_contract(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "metrics.csv",
            "state.json", "status.json", "samples"} <= names
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["model"]["name"] == "improved_unet"
    header = (tiny_run / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,epoch,loss,lr,elapsed_s,images_per_s"
    rows = runs.read_metrics(tiny_run)
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert (tiny_run / "samples" / "final.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert runs.read_status(tiny_run)["state"] == "finished"


def test_loaded_model_reproduces_the_saved_weights(tiny_run):
    loaded = runs.load_model(tiny_run, use_ema=False)
    saved = load_file(str(tiny_run / "model.safetensors"))
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert runs.load_model(tiny_run).used_ema


def test_loss_goes_down_on_learnable_data(tmp_path, tiny_images):
    run = runs.create_run(tmp_path, "learn", tiny_config(max_steps=60, epochs=0, log_every=10, lr=3e-3))
    train_run(run, images=tiny_images)
    losses = [r["loss"] for r in runs.read_metrics(run)]
    assert losses[-1] < 0.6 * losses[0]


def test_resume_continues_steps_and_metrics(tmp_path, tiny_images):
    run = runs.create_run(tmp_path, "resume", tiny_config(max_steps=4, epochs=0))
    train_run(run, images=tiny_images)
    optimizer_before = load_file(str(run / "optimizer.safetensors"))
    cfg = runs.load_config(run)
    io.atomic_write_text(run / "config.json", tiny_config(max_steps=8, epochs=0).to_json())
    progress = train_run(run, resume=True, images=tiny_images)
    assert progress.step == 8
    assert [int(r["step"]) for r in runs.read_metrics(run)] == [2, 4, 6, 8]
    assert cfg.train.max_steps == 4
    assert any(k.endswith("exp_avg") for k in optimizer_before)  # Adam moments were saved
    # ... and loaded: Adam's step count went on from 4 (a fresh optimizer would count 4 steps, not 8)
    assert int(load_file(str(run / "optimizer.safetensors"))["0.step"]) == 8
    assert io.weights_metadata(run / "model.safetensors")["step"] == "8"


@pytest.mark.parametrize("variant", ["unconditional", "label-dropout", "network-dropout"])
def test_stop_and_resume_gives_the_losses_of_a_run_that_never_stopped(tmp_path, tiny_images, variant):
    """20 steps straight against 10, stop, resume, 10 more: the same loss at every step. An epoch is
    8 steps, so the stop falls mid-epoch (the data order must continue) and the run crosses two
    epoch ends; the other variants also draw per-sample label dropout or dropout masks. The old loop failed this:
    its resume replayed the t / ε stream from step 0 (the random state was not saved)."""
    config = tiny_config(max_steps=20, epochs=0, log_every=1, ema_decay=0.9)
    if variant == "label-dropout":
        config = replace(config, model=replace(config.model, num_classes=10),
                         train=replace(config.train, label_dropout=0.3, label_dropout_mode="sample"))
    if variant == "network-dropout":  # nn.Dropout's masks come from the global generator
        config = replace(config, model=replace(config.model, dropout=0.2))
    straight = runs.create_run(tmp_path, "straight", config)
    train_run(straight, images=tiny_images)
    halves = runs.create_run(tmp_path, "halves", replace(config, train=replace(config.train, max_steps=10)))
    assert train_run(halves, images=tiny_images).state == "finished"
    io.atomic_write_text(halves / "config.json", config.to_json())
    assert train_run(halves, resume=True, images=tiny_images).step == 20

    expected, got = runs.read_metrics(straight), runs.read_metrics(halves)
    assert [int(r["step"]) for r in got] == [int(r["step"]) for r in expected] == list(range(1, 21))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got], dtype=torch.float64),
                               torch.tensor([r["loss"] for r in expected], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    for name in ("model.safetensors", "ema.safetensors"):  # and so the same weights at the end
        for key, value in load_file(str(straight / name)).items():
            torch.testing.assert_close(load_file(str(halves / name))[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_epochs_bound_the_run(tmp_path, tiny_images):
    run = runs.create_run(tmp_path, "epochs", tiny_config(max_steps=0, epochs=2, batch_size=64))
    progress = train_run(run, images=tiny_images)
    assert progress.step == 2 * (256 // 64) and progress.epoch == 2


def test_batch_larger_than_the_data_is_refused(tmp_path, tiny_images):
    run = runs.create_run(tmp_path, "big", tiny_config(batch_size=1000))
    with pytest.raises(ConfigError, match="batch_size = 1000"):
        train_run(run, images=tiny_images)
    assert runs.read_status(run)["state"] == "failed"


def test_divergence_fails_the_run_with_a_cause(tmp_path, tiny_images):
    """AdamW with lr × weight_decay > 1 flips the weights' sign each step: the loss blows up, and the
    run stops as failed saying why."""
    run = runs.create_run(tmp_path, "nan", tiny_config(lr=1.0, weight_decay=10.0, max_steps=40, epochs=0))
    with pytest.raises(TrainingDiverged, match="weight_decay"):
        train_run(run, images=tiny_images)
    status = runs.read_status(run)
    assert status["state"] == "failed" and "diverged" in status["error"]


def test_background_job_stops_and_saves(tmp_path, tiny_images):
    run = runs.create_run(tmp_path, "job", tiny_config(max_steps=100000, epochs=0, log_every=1))
    job = TrainingJob(run, images=tiny_images).start()
    waiter = threading.Event()
    for _ in range(6000):  # wait for progress (generously: the machine may be busy), not a timing check
        if job.snapshot().step >= 3:
            break
        waiter.wait(0.05)
    job.stop()
    assert job.join(timeout=300)
    snap = job.snapshot()
    assert snap.state == "stopped" and snap.step >= 3
    assert runs.read_status(run)["state"] == "stopped"
    assert io.weights_metadata(run / "model.safetensors")["step"] == str(snap.step)
    assert snap.losses and len(snap.losses) == len(snap.steps)


def test_background_job_failure_is_reported_not_raised(tmp_path):
    run = runs.create_run(tmp_path, "fail", tiny_config(batch_size=999))
    job = TrainingJob(run, images=make_tiny_images()).start()
    assert job.join(timeout=60)
    snap = job.snapshot()
    assert snap.state == "failed" and "batch_size = 999" in snap.error
