"""core.jobs: one training run at a time, resume, and background sampling with progress and cancel."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from core.store import io, runs
from core.config import ConfigError, SampleConfig, override
from core.work.jobs import JobBusy, JobManager, ReportingJob, SamplingJob
from core.diffusion.sampling import sample
from core.diffusion.schedule import NoiseScheduler


def test_one_training_run_at_a_time_and_no_folder_for_a_refused_start(tmp_path, tiny_images):
    manager = JobManager()
    runs_dir = tmp_path / "runs"
    long = tiny_config(max_steps=100_000, epochs=1000)
    job = manager.start_new(runs_dir, "first", long, images=tiny_images)
    try:
        assert manager.busy()
        with pytest.raises(JobBusy, match="one run at a time"):
            manager.start_new(runs_dir, "second", tiny_config(), images=tiny_images)
        assert not (runs_dir / "second").exists()
        with pytest.raises(JobBusy):
            manager.resume(runs_dir / "first", images=tiny_images)
    finally:
        assert manager.stop()
        assert job.join(60)
    assert job.snapshot().state == "stopped"
    assert not manager.busy() and not manager.stop()
    assert runs.read_status(runs_dir / "first")["state"] == "stopped"


def test_resume_continues_a_stopped_run(tmp_path, tiny_images):
    manager = JobManager()
    runs_dir = tmp_path / "runs"
    job = manager.start_new(runs_dir, "r", tiny_config(max_steps=100_000, epochs=1000), images=tiny_images)
    while job.alive and job.snapshot().step < 4:
        job.join(0.05)
    manager.stop()
    job.join(60)
    stopped_at = job.snapshot().step
    assert stopped_at >= 4

    # A resumed run trains under its config.json: give it four more steps to go.
    config = override(runs.load_config(runs_dir / "r"), max_steps=stopped_at + 4)
    io.atomic_write_text(runs_dir / "r" / "config.json", config.to_json())
    resumed = manager.resume(runs_dir / "r", images=tiny_images)
    assert resumed.join(60)
    final = resumed.snapshot()
    assert final.state == "finished" and final.step == stopped_at + 4


def test_a_bad_start_raises_a_config_error_and_leaves_the_manager_free(tmp_path, tiny_images):
    manager = JobManager()
    with pytest.raises(ConfigError, match="name"):
        manager.start_new(tmp_path / "runs", "../escape", tiny_config(), images=tiny_images)
    assert manager.job is None and not manager.busy()


def test_resume_refuses_a_damaged_run(tmp_path):
    broken = tmp_path / "runs" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(runs.RunError, match="not valid JSON"):
        JobManager().resume(broken)


def test_sampling_job_matches_direct_sampling(tiny_run):
    loaded = runs.load_model(tiny_run)
    scheduler = NoiseScheduler(loaded.config.schedule)
    config = SampleConfig(sampler="ddim", steps=5, n=3, seed=7)
    job = SamplingJob(loaded.model, scheduler, config, pixel_range=loaded.config.train.pixel_range).start()
    assert job.join(60)
    status = job.snapshot()
    assert status.state == "finished" and status.done == status.total == 5 and status.fraction == 1.0
    direct = sample(loaded.model, scheduler, config, pixel_range=loaded.config.train.pixel_range, record="all")
    np.testing.assert_array_equal(job.result.images, direct.images)
    assert job.result.frame_timesteps == direct.frame_timesteps
    assert job.result.frames_x0.shape == (5, 3, 1, 28, 28)


def test_sampling_job_cancel_and_failure_are_reported(tiny_run):
    loaded = runs.load_model(tiny_run)
    scheduler = NoiseScheduler(loaded.config.schedule)
    job = SamplingJob(loaded.model, scheduler, SampleConfig(sampler="ddpm", n=2), pixel_range="symmetric")
    job.cancel()  # cancelled before the first step finishes: the loop stops after one step
    job.start()
    assert job.join(60)
    assert job.snapshot().state == "cancelled" and job.result is None

    bad = SamplingJob(loaded.model, scheduler, SampleConfig(sampler="ddpm", steps=3, n=2), pixel_range="symmetric")
    bad.start()
    assert bad.join(60)
    status = bad.snapshot()
    assert status.state == "failed" and "DDPM runs every step" in status.error


class _Countdown(ReportingJob):
    """The smallest ReportingJob: it counts the steps of a generator through `_counted` and keeps
    nothing of its own (the sampling and evaluation jobs set `_done` themselves, which hid that
    `_counted` read a field only subclasses created)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def work(self) -> None:
        for _ in self._counted(step for step in range(self.steps)):  # a generator, as reverse_process is
            pass
        with self._lock:
            self._state = "finished"


def test_a_reporting_job_counts_the_steps_it_passes_through():
    job = _Countdown(5).start()
    assert job.join(60)
    assert (job._state, job._error, job._done) == ("finished", None, 5)
