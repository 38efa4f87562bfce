"""Time estimates from this machine's own recent work (core.work.estimates): recorded by the jobs
that ran, read back bounded and range-checked, and close to the time the work then takes."""
from __future__ import annotations

import json
import os
import time

import torch

from conftest import tiny_config
from core.config import ModelConfig, SampleConfig, ScheduleConfig
from core.diffusion.schedule import NoiseScheduler
from core.models import build_model
from core.work import estimates
from core.work.jobs import SamplingJob

TINY = tiny_config().model


def assert_within(predict_then_measure, low: float, high: float, tries: int = 3) -> None:
    """(estimate, measured seconds) within [low, high] x measured. An estimate and the work it predicts are
    timed a few seconds apart: on a shared machine the load can change in between, so the pair is taken
    again (at most `tries` times) before it counts as a miss. An estimate that is wrong misses every time."""
    for _ in range(tries):
        guess, took = predict_then_measure()
        if low * took <= guess <= high * took:
            return
    raise AssertionError(f"estimate {guess:.2f} s against {took:.2f} s measured, {tries} times outside "
                         f"[{low}, {high}] x")


def _sample_job(runs_dir, model, scheduler, sampler: str, steps: int, n: int) -> float:
    """Run one SamplingJob that records its timing; its wall time in seconds."""
    config = SampleConfig(sampler=sampler, steps=steps, n=n, seed=0)
    job = SamplingJob(model, scheduler, config, pixel_range="symmetric", record="none",
                      timing=(runs_dir, estimates.network_key(TINY))).start()
    job.join()
    status = job.snapshot()
    assert status.state == "finished", status.error
    return status.elapsed_s


def _estimate(runs_dir, sampler: str, steps: int, n: int) -> estimates.Estimate:
    found = estimates.estimate_sampling(estimates.read_timings(runs_dir), estimates.network_key(TINY), "cpu",
                                        sampler, steps, n, SampleConfig.batch_size)
    assert found is not None
    return found


def test_sampling_estimate_within_half_of_the_measured_time(tmp_path):
    torch.manual_seed(0)
    model, scheduler = build_model(TINY), NoiseScheduler(ScheduleConfig(timesteps=200))
    assert _estimate_or_none(tmp_path) is None  # nothing recorded, no calibration: no made-up figure
    _sample_job(tmp_path, model, scheduler, "ddim", 40, 8)          # the recent work

    def predict_then_measure() -> tuple[float, float]:
        guess = _estimate(tmp_path, "ddim", 120, 8)
        assert guess.source == "measured"
        return guess.seconds, _sample_job(tmp_path, model, scheduler, "ddim", 120, 8)

    assert_within(predict_then_measure, 0.5, 1.5)


def _estimate_or_none(runs_dir):
    return estimates.estimate_sampling(estimates.read_timings(runs_dir), estimates.network_key(TINY), "cpu",
                                       "ddim", 10, 8, SampleConfig.batch_size)


def test_ddpm_1000_estimate_from_a_few_step_run_within_2x(tmp_path):
    torch.manual_seed(0)
    model, scheduler = build_model(TINY), NoiseScheduler(ScheduleConfig(timesteps=1000))
    _sample_job(tmp_path, model, scheduler, "dpmpp2m", 50, 16)

    def predict_then_measure() -> tuple[float, float]:
        guess = _estimate(tmp_path, "ddpm", 1000, 16)
        assert guess.source in ("scaled", "measured")  # scaled from dpmpp2m; a retry has DDPM's own record
        return guess.seconds, _sample_job(tmp_path, model, scheduler, "ddpm", 0, 16)

    guess = _estimate(tmp_path, "ddpm", 1000, 16)
    assert guess.source == "scaled"  # another sampler of the same network and batch
    assert_within(predict_then_measure, 0.5, 2.0)


def test_calibrated_fallback_before_any_work_within_half(tmp_path):
    torch.manual_seed(0)
    model, scheduler = build_model(TINY), NoiseScheduler(ScheduleConfig(timesteps=100))

    def predict_then_measure() -> tuple[float, float]:
        found = estimates.estimate_sampling([], estimates.network_key(TINY), "cpu", "ddim", 100, 8, 256,
                                            lambda batch: estimates.measure_forward_seconds(model, batch))
        assert found is not None and found.source == "calibrated"
        return found.seconds, _sample_job(tmp_path, model, scheduler, "ddim", 100, 8)

    assert_within(predict_then_measure, 0.5, 1.5)


def test_training_step_time_from_metrics_rows_and_its_estimate(tmp_path, tiny_images):
    from core.store import runs
    from core.train.training import train_run
    run_dir = runs.create_run(tmp_path, "t", tiny_config(max_steps=40, epochs=3, log_every=2, batch_size=16))
    started = time.perf_counter()
    train_run(run_dir, images=tiny_images)
    took = time.perf_counter() - started
    config = runs.load_config(run_dir)
    assert estimates.record_training(run_dir, config.model, "cpu", 16)
    work = estimates.Work("train", estimates.network_key(config.model), "cpu", 16)
    steps = int(runs.read_metrics(run_dir)[-1]["step"])
    assert steps == 40
    guess = estimates.estimate_steps(estimates.read_timings(tmp_path), work, steps)
    assert guess is not None and guess.source == "measured"
    # The estimate counts steps only; the run also loads data and writes checkpoints, so it may be shorter.
    assert 0.3 * took <= guess.seconds <= 1.5 * took, (guess.seconds, took)


def test_network_key_tells_networks_apart():
    assert estimates.network_key(TINY) == estimates.network_key(ModelConfig(**vars(TINY)))
    assert estimates.network_key(TINY) != estimates.network_key(ModelConfig())


def test_hostile_or_damaged_timings_are_skipped(tmp_path):
    good = {"kind": "sample", "network": "n", "device": "cpu", "sampler": "ddim", "batch": 8, "step_s": 0.01,
            "at": 1.0}
    bad = [dict(good, step_s=-1), dict(good, step_s=1e9), dict(good, batch=0), dict(good, batch=True),
           dict(good, kind="evil"), dict(good, network="x" * 500), "text", None, dict(good, step_s="0.1")]
    path = estimates.timings_path(tmp_path)
    path.write_text(json.dumps({"entries": bad + [good]}))
    assert estimates.read_timings(tmp_path) == [good]
    path.write_text("{not json")
    assert estimates.read_timings(tmp_path) == []
    path.write_bytes(b" " * (estimates.MAX_TIMINGS_BYTES + 1))
    assert estimates.read_timings(tmp_path) == []
    path.unlink()
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"entries": [good]}))
    os.symlink(outside, path)
    assert estimates.read_timings(tmp_path) == []  # a link is not followed out of the runs folder


def test_record_keeps_one_entry_per_work_and_ignores_noise(tmp_path):
    work = estimates.Work("sample", "n", "cpu", 8, "ddim")
    assert not estimates.record(tmp_path, work, 0.001, 10)     # too short to be a measurement
    assert estimates.record(tmp_path, work, 1.0, 10)
    assert estimates.record(tmp_path, work, 2.0, 10)
    entries = estimates.read_timings(tmp_path)
    assert len(entries) == 1 and abs(entries[0]["step_s"] - 0.2) < 1e-9
    assert not estimates.record(tmp_path / "missing", work, 1.0, 10)
