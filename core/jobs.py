"""Process-wide bookkeeping for background work: one training job at a time, and sampling jobs.

The dashboard keeps one `JobManager` per server process (in `st.cache_resource`), so a page
reload or a second browser tab sees the same running job. Nothing here draws anything: the UI
polls `snapshot()` copies, taken under a lock, and the worker threads make no UI calls.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import runs
from .config import RunConfig, SampleConfig
from .data import ImageSet
from .sampling import SampleResult, sample
from .schedule import NoiseScheduler
from .training import TrainingJob

RESUMABLE_STATES = ("stopped", "interrupted", "failed", "finished")


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

    def start_new(self, runs_dir: str | os.PathLike, name: str, config: RunConfig, *,
                  images: ImageSet | None = None, data_root: str | None = None) -> TrainingJob:
        """Create run folder `name` and train it in the background.

        The busy check and the folder creation happen under one lock, so two clicks (or two tabs)
        can never leave a second run folder behind that never trains.
        """
        with self._lock:
            self._refuse_if_busy()
            run_dir = runs.create_run(runs_dir, name, config)
            self._job = TrainingJob(run_dir, images=images, data_root=data_root).start()
            return self._job

    def resume(self, run_dir: str | os.PathLike, *, images: ImageSet | None = None,
               data_root: str | None = None) -> TrainingJob:
        """Continue an existing run from its last checkpoint in the background."""
        run_dir = Path(run_dir)
        with self._lock:
            self._refuse_if_busy()
            info = runs.run_info(run_dir)
            if not info.readable:
                raise runs.RunError(info.error or f"run {run_dir.name!r} cannot be read")
            if info.state == "running":
                raise JobBusy(f"run {run_dir.name!r} is being trained by another process "
                              f"(pid {runs.read_status(run_dir).get('pid')}); wait for it or stop it there")
            self._job = TrainingJob(run_dir, resume=True, images=images, data_root=data_root).start()
            return self._job

    def stop(self) -> bool:
        """Ask the running job to stop (it saves a checkpoint first). False when none runs."""
        job = self.job
        if job is None or not job.alive:
            return False
        job.stop()
        return True


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


class SamplingJob:
    """`core.sampling.sample` in a background thread, with progress and cancel.

    The result (images and every recorded frame) is kept on the job once it finishes.
    """

    def __init__(self, model: nn.Module, scheduler: NoiseScheduler, config: SampleConfig, *,
                 pixel_range: str, record: str = "all", device: torch.device | str = "cpu"):
        self._args = (model, scheduler, config)
        self._pixel_range, self._record, self._device = pixel_range, record, device
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._done, self._total = 0, 0
        self._state, self._error = "running", None
        self._started = time.perf_counter()
        self._ended: float | None = None
        self.result: SampleResult | None = None
        self.traceback: str | None = None
        self._thread: threading.Thread | None = None

    def _progress(self, done: int, total: int) -> None:
        with self._lock:
            self._done, self._total = done, total

    def _main(self) -> None:
        model, scheduler, config = self._args
        try:
            result = sample(model, scheduler, config, pixel_range=self._pixel_range, device=self._device,
                            record=self._record, progress=self._progress, should_stop=self._cancel.is_set)
            state, error = "finished", None
        except InterruptedError:
            result, state, error = None, "cancelled", None
        except Exception as exc:  # noqa: BLE001 - the thread must report, never die silently
            self.traceback = traceback.format_exc()
            result, state, error = None, "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.result, self._state, self._error = result, state, error
            self._ended = time.perf_counter()

    def start(self) -> "SamplingJob":
        if self._thread is not None:
            raise RuntimeError("this sampling job was already started")
        self._thread = threading.Thread(target=self._main, name="sampling", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is not None and not self._thread.is_alive()

    def snapshot(self) -> SamplingStatus:
        with self._lock:
            end = self._ended if self._ended is not None else time.perf_counter()
            return SamplingStatus(self._state, self._done, self._total, end - self._started, self._error)
