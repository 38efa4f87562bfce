"""Background work: a training job, a sampling job, and the process-wide `JobManager` (the
evaluation jobs are in `evaluation_jobs`, the run queue's worker in `queue_worker`).

The dashboard keeps one `JobManager` per server process (in `st.cache_resource`), so a page
reload or a second browser tab sees the same running job. Nothing here draws anything: the UI
polls `snapshot()` copies, taken under a lock, and the worker threads make no UI calls.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import budget
from . import estimates, queue
from ..store import runs
from ..config import ConfigError, RunConfig, SampleConfig
from ..data.datasets import IMAGE_SHAPE, ImageSet
from ..device import resolve_device
from ..errors import RunError
from ..diffusion.sampling import SampleResult, collect, reverse_process, total_steps
from ..diffusion.schedule import NoiseScheduler
from ..train.training import Progress, train_run
from .background import BackgroundJob, JobBusy, ReportingJob
# The evaluation jobs live in evaluation_jobs.py and the queue worker in queue_worker.py; the names
# below stay importable from here for the dashboard.
from .evaluation_jobs import PHASES, EvaluationJob, EvaluationManager, EvaluationStatus, classifier_ready
from .queue_worker import QueueRunner, record_training_time

__all__ = ["BackgroundJob", "EvaluationJob", "EvaluationManager", "EvaluationStatus", "JobBusy",
           "JobManager", "PHASES", "QueueRunner", "ReportingJob", "SamplingJob", "SamplingStatus", "TrainingJob",
           "classifier_ready", "record_training_time"]

class TrainingJob(BackgroundJob):
    """One training run (`training.train_run`) in the background, with start / stop / snapshot."""

    def __init__(self, run_dir: Path, *, resume: bool = False, images: ImageSet | None = None,
                 data_root: str | None = None, lock: runs.RunLock | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.thread_name = f"train-{self.run_dir.name}"
        self._resume, self._images, self._data_root = resume, images, data_root
        self._lock_of_run = lock  # taken by the caller, so a busy run is refused before the thread starts
        self._progress = Progress(run_name=self.run_dir.name, run_dir=str(self.run_dir))

    def _update(self, progress: Progress) -> None:
        copied = replace(progress, steps=list(progress.steps), losses=list(progress.losses))
        with self._lock:
            self._progress = copied

    def work(self) -> None:
        progress = train_run(self.run_dir, resume=self._resume, images=self._images, data_root=self._data_root,
                             on_progress=self._update, stop_event=self._stop, lock=self._lock_of_run)
        record_training_time(self.run_dir, progress)

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._progress.state != "failed":
                self._progress = replace(self._progress, state="failed", error=str(exc))

    def snapshot(self) -> Progress:
        with self._lock:
            p = self._progress
            return replace(p, steps=list(p.steps), losses=list(p.losses))


@dataclass(frozen=True)
class SamplingStatus:
    state: str          # running, finished, failed, cancelled
    done: int
    total: int
    elapsed_s: float
    error: str | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far (every reverse step costs about the same)."""
        if not self.done or not self.total or self.state != "running":
            return None
        return self.elapsed_s / self.done * (self.total - self.done)


class SamplingJob(ReportingJob):
    """The reverse process in the background, with progress and cancel; keeps the result (images
    and every recorded frame) once it finishes."""

    thread_name = "sampling"

    def __init__(self, model: nn.Module, scheduler: NoiseScheduler, config: SampleConfig, *,
                 pixel_range: str, clip_default: bool = False, record: str = "all",
                 device: torch.device | str = "cpu", labels: torch.Tensor | None = None, guidance: float = 1.0,
                 prediction: str = "eps", timing: tuple[Path, str] | None = None,
                 shape: tuple[int, int, int] = IMAGE_SHAPE):
        """`timing` (runs folder, network_key) records the step time there when the job finishes."""
        super().__init__()
        self._timing = timing
        self._args: dict[str, Any] = dict(model=model, scheduler=scheduler, config=config, pixel_range=pixel_range,
                                          clip_default=clip_default, device=device, labels=labels,
                                          guidance=guidance, prediction=prediction, shape=shape)
        self._record = record
        self._done, self._total = 0, total_steps(config, scheduler)
        self.result: SampleResult | None = None

    def work(self) -> None:
        result = collect(self._counted(reverse_process(**self._args)), pixel_range=self._args["pixel_range"],
                         record=self._record)
        with self._lock:
            if self.stop_requested and self._done < self._total:
                self._state = "cancelled"
            else:
                self.result, self._state = result, "finished"
            self._ended = time.perf_counter()
            seconds = self._ended - self._started
        if self._timing is not None and self._state == "finished":
            self._save_timing(seconds)

    def _save_timing(self, seconds: float) -> None:
        config, guidance = self._args["config"], self._args["guidance"]
        labels_guided = self._args["labels"] is not None and guidance not in (0.0, 1.0)
        work = estimates.Work("sample", self._timing[1], resolve_device(self._args["device"]).type,
                              min(config.n, config.batch_size), config.sampler + ("+cfg" if labels_guided else ""))
        estimates.record(self._timing[0], work, seconds, self._total)

    def snapshot(self) -> SamplingStatus:
        with self._lock:
            end = self._ended if self._ended is not None else time.perf_counter()
            return SamplingStatus(self._state, self._done, self._total, end - self._started, self._error)


class JobManager:
    """Holds at most one running `TrainingJob` and the process's one `QueueRunner`: one run trains at a
    time. Starting a direct job while the queue trains a run raises `JobBusy` (add it to the queue
    instead); the queue, for its part, waits while a direct job trains and starts its next run after.

    The last job stays available after it ends, so the page can show how it finished.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: TrainingJob | None = None
        self._queue: QueueRunner | None = None

    @property
    def job(self) -> TrainingJob | None:
        with self._lock:
            return self._job

    def busy(self) -> bool:
        job = self.job
        return job is not None and job.alive

    def _direct_job_alive(self) -> bool:
        # Called with the lock held (the queue runner's guard).
        return self._job is not None and self._job.alive

    def _refuse_if_busy(self) -> None:
        # Called with the lock held.
        if self._job is not None and self._job.alive:
            raise JobBusy(f"run {self._job.run_dir.name!r} is still training: one run at a time. "
                          "Stop it (or wait for it to finish) before starting another.")
        training = self._queue.training_run if self._queue is not None else None
        if training is not None:
            raise JobBusy(f"the queue is training run {training!r}: one run at a time. Add this run to the "
                          "queue instead (it trains when the queue gets to it), or stop the queue's run first.")

    @staticmethod
    def _check_memory(config: RunConfig) -> None:
        """Refuse a run that cannot fit this machine's memory. A device that is missing is left to
        the job, which marks the run failed with that message (as the page shows it)."""
        try:
            device = resolve_device(config.train.device)
        except ConfigError:
            return
        budget.check_training_fits(config, device)

    def start_new(self, runs_dir: str | os.PathLike, name: str, config: RunConfig, *,
                  images: ImageSet | None = None, data_root: str | None = None) -> TrainingJob:
        """Create run folder `name` and train it in the background.

        The busy check and the folder creation happen under one lock, so two clicks (or two tabs)
        can never leave a second run folder behind that never trains.
        """
        with self._lock:
            self._refuse_if_busy()
            self._check_memory(config)  # before the folder exists
            run_dir = runs.create_run(runs_dir, name, config)
            lock = runs.RunLock(run_dir).acquire()
            self._job = TrainingJob(run_dir, images=images, data_root=data_root, lock=lock)
            self._job.start()
            return self._job

    def resume(self, run_dir: str | os.PathLike, *, images: ImageSet | None = None,
               data_root: str | None = None) -> TrainingJob:
        """Continue an existing run from its last checkpoint in the background."""
        run_dir = Path(run_dir)
        with self._lock:
            self._refuse_if_busy()
            if not runs.is_run_folder(run_dir, run_dir.parent):  # a symlink would train into its target
                raise RunError(f"run {run_dir.name!r}: not a run folder inside {run_dir.parent} (a symbolic link?)")
            info = runs.run_info(run_dir)
            if not info.readable:
                raise RunError(info.error or f"run {run_dir.name!r} cannot be read")
            self._check_memory(info.config)
            # The lock, not the listed state, decides: a CLI resume started a moment ago is refused too.
            lock = runs.RunLock(run_dir).acquire()
            self._job = TrainingJob(run_dir, resume=True, images=images, data_root=data_root, lock=lock)
            self._job.start()
            return self._job

    def stop(self) -> bool:
        """Ask the running job to stop (it saves a checkpoint first). False when none runs."""
        job = self.job
        if job is None or not job.alive:
            return False
        job.stop()
        return True

    # -- the queue --------------------------------------------------------------------------------------
    @property
    def queue_runner(self) -> QueueRunner | None:
        with self._lock:
            return self._queue

    def ensure_queue_runner(self, runs_dir: str | os.PathLike, **kwargs: Any) -> QueueRunner:
        """The process's queue worker for `runs_dir`, started if it is not running. It idles (polling
        queue.json about once a second) for as long as the process lives, so runs queued from the CLI
        or another tab start without a click here. A worker of another runs folder (tests switch
        folders) is stopped: its current run checkpoints and its entry is marked stopped."""
        runs_dir = Path(runs_dir)
        with self._lock:
            current = self._queue
            if current is not None and current.alive and current.runs_dir == runs_dir.resolve():
                return current
            if current is not None:
                current.stop()  # ends after its current run; the worker lock keeps the two apart
            self._queue = QueueRunner(runs_dir, guard=self._lock, may_start=lambda: not self._direct_job_alive(),
                                      **kwargs)
            self._queue.start()
            return self._queue

    def queue_new(self, runs_dir: str | os.PathLike, name: str, config: RunConfig, **kwargs: Any) -> queue.Entry:
        """Create run folder `name` and queue it (the queue worker starts it when its turn comes).
        A damaged queue file or a run that cannot fit is refused before the folder exists."""
        with self._lock:
            self._check_memory(config)
            queue.read_queue(runs_dir)  # QueueDamaged before anything is created
            run_dir = runs.create_run(runs_dir, name, config)
            try:
                entry = queue.add(runs_dir, [name])[0]
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)  # just created, never trained: leave nothing behind
                raise
        self.ensure_queue_runner(runs_dir, **kwargs)
        return entry

    def stop_queue_run(self) -> bool:
        """Stop the run the queue trains (checkpoint first); its entry becomes stopped and the queue
        pauses. False when the queue trains nothing here."""
        runner = self.queue_runner
        return runner.stop_current() if runner is not None else False
