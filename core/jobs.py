"""Background work: a training job, a sampling job, and the process-wide manager of training.

The dashboard keeps one `JobManager` per server process (in `st.cache_resource`), so a page
reload or a second browser tab sees the same running job. Nothing here draws anything: the UI
polls `snapshot()` copies, taken under a lock, and the worker threads make no UI calls.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import budget, runs
from .config import ConfigError, RunConfig, SampleConfig
from .device import resolve_device
from .data import ImageSet
from .errors import RunError
from .sampling import SampleResult, collect, reverse_process, total_steps
from .schedule import NoiseScheduler
from .training import Progress, train_run


class BackgroundJob:
    """A daemon thread running `work()`, with stop / join / alive and a lock for its report.

    Subclasses implement `work()` (which checks `self.stop_requested` where it can stop) and
    `snapshot()`; a failure inside `work()` is caught and handed to `failed()`, never lost.
    """

    thread_name = "job"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.traceback: str | None = None

    def work(self) -> None:
        raise NotImplementedError

    def failed(self, exc: BaseException) -> None:
        """Record a failure of `work()`; called with the traceback already kept."""

    def _main(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # noqa: BLE001 - the thread must report, never die silently
            self.traceback = traceback.format_exc()
            self.failed(exc)

    def start(self) -> "BackgroundJob":
        if self._thread is not None:
            raise RuntimeError("this job was already started")
        self._thread = threading.Thread(target=self._main, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is not None and not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


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
        train_run(self.run_dir, resume=self._resume, images=self._images, data_root=self._data_root,
                  on_progress=self._update, stop_event=self._stop, lock=self._lock_of_run)

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


class SamplingJob(BackgroundJob):
    """The reverse process in the background, with progress and cancel; keeps the result (images
    and every recorded frame) once it finishes."""

    thread_name = "sampling"

    def __init__(self, model: nn.Module, scheduler: NoiseScheduler, config: SampleConfig, *,
                 pixel_range: str, clip_default: bool = False, record: str = "all",
                 device: torch.device | str = "cpu"):
        super().__init__()
        self._args: dict[str, Any] = dict(model=model, scheduler=scheduler, config=config, pixel_range=pixel_range,
                                          clip_default=clip_default, device=device)
        self._record = record
        self._done, self._total = 0, total_steps(config, scheduler)
        self._state, self._error = "running", None
        self._started = time.perf_counter()
        self._ended: float | None = None
        self.result: SampleResult | None = None

    def _counted(self, steps):
        """Pass the steps through, counting them, and end the iteration when cancelled."""
        try:
            for step in steps:
                yield step
                with self._lock:
                    self._done += 1
                if self.stop_requested:
                    return
        finally:
            steps.close()  # runs the reverse process's clean-up (the model's train/eval mode) now

    def work(self) -> None:
        result = collect(self._counted(reverse_process(**self._args)), pixel_range=self._args["pixel_range"],
                         record=self._record)
        with self._lock:
            if self.stop_requested and self._done < self._total:
                self._state = "cancelled"
            else:
                self.result, self._state = result, "finished"
            self._ended = time.perf_counter()

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._state, self._error = "failed", f"{type(exc).__name__}: {exc}"
            self._ended = time.perf_counter()

    def cancel(self) -> None:
        self.stop()

    def snapshot(self) -> SamplingStatus:
        with self._lock:
            end = self._ended if self._ended is not None else time.perf_counter()
            return SamplingStatus(self._state, self._done, self._total, end - self._started, self._error)


class JobBusy(RuntimeError):
    """A training job is already running; the message names it and what to do."""


class JobManager:
    """Holds at most one running `TrainingJob`; starting a second one raises `JobBusy`.

    The last job stays available after it ends, so the page can show how it finished.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: TrainingJob | None = None

    @property
    def job(self) -> TrainingJob | None:
        with self._lock:
            return self._job

    def busy(self) -> bool:
        job = self.job
        return job is not None and job.alive

    def _refuse_if_busy(self) -> None:
        # Called with the lock held.
        if self._job is not None and self._job.alive:
            raise JobBusy(f"run {self._job.run_dir.name!r} is still training: one run at a time. "
                          "Stop it (or wait for it to finish) before starting another.")

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
