"""Background work: a training job, a sampling job, an evaluation job, and the process-wide managers.

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
from .data import ImageSet, load_images
from .device import resolve_device
from .errors import RunError
from .evaluation.classifier import FitConfig, classifier_path
from .evaluation.frechet import QualityEvaluator
from .evaluation.scoring import load_or_fit_classifier, score_setting, setting_name
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


class ReportingJob(BackgroundJob):
    """A background job that reports a state (running, finished, failed, cancelled), an error and
    its own clock; cancelling is stopping."""

    def __init__(self) -> None:
        super().__init__()
        self._state, self._error = "running", None
        self._started = time.perf_counter()
        self._ended: float | None = None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._state, self._error = "failed", f"{type(exc).__name__}: {exc}"
            self._ended = time.perf_counter()

    def cancel(self) -> None:
        self.stop()


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


class SamplingJob(ReportingJob):
    """The reverse process in the background, with progress and cancel; keeps the result (images
    and every recorded frame) once it finishes."""

    thread_name = "sampling"

    def __init__(self, model: nn.Module, scheduler: NoiseScheduler, config: SampleConfig, *,
                 pixel_range: str, clip_default: bool = False, record: str = "all",
                 device: torch.device | str = "cpu", labels: torch.Tensor | None = None, guidance: float = 1.0,
                 prediction: str = "eps"):
        super().__init__()
        self._args: dict[str, Any] = dict(model=model, scheduler=scheduler, config=config, pixel_range=pixel_range,
                                          clip_default=clip_default, device=device, labels=labels,
                                          guidance=guidance, prediction=prediction)
        self._record = record
        self._done, self._total = 0, total_steps(config, scheduler)
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


# -- evaluation ---------------------------------------------------------------------------------------------
CLASSIFIER_FIT_S = 180.0  # fitting the FashionMNIST classifier once on 2 CPU cores (about 3 minutes)
PHASES = ("loading", "fitting classifier", "sampling", "scoring", "done")


@dataclass(frozen=True)
class EvaluationStatus:
    run_name: str
    setting: str        # e.g. dpmpp2m-20 (the eval.json key)
    state: str          # running, finished, failed, cancelled
    phase: str          # one of PHASES
    done: int           # reverse steps done (phase sampling) or classifier steps (fitting)
    total: int
    elapsed_s: float
    eta_s: float | None
    error: str | None
    entry: dict[str, Any] | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def active(self) -> bool:
        return self.state == "running"


def measure_call_seconds(model: nn.Module, batch: int = 16, device: torch.device | str = "cpu",
                         repeats: int = 2) -> float:
    """Seconds of one network evaluation per image at `batch` images (best of `repeats`)."""
    device = resolve_device(device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.full((batch,), 1, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    best = float("inf")
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                model(x, t)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - start)
    finally:
        model.train(was_training)
    return best / batch


def estimate_evaluation_seconds(config: SampleConfig, scheduler: NoiseScheduler, call_s_per_image: float,
                                classifier_ready: bool) -> float:
    """Sampling (network evaluations × images × the measured cost), scoring, and a classifier fit if needed."""
    steps = config.resolved_steps(scheduler.num_timesteps)
    sampling = steps * config.n * call_s_per_image * 1.1  # the sampler's own arithmetic on top
    scoring = 5.0 + config.n * 0.002                      # test statistics (cached after once) and features
    return sampling + scoring + (0.0 if classifier_ready else CLASSIFIER_FIT_S)


def classifier_ready(dataset: str, directory: str | os.PathLike | None = None) -> bool:
    return classifier_path(dataset, directory).is_file()


class EvaluationJob(ReportingJob):
    """Score one run at one sampler setting in the background, as `python -m core eval` does, and add
    the entry to its eval.json. Fits the dataset's classifier first when it is missing."""

    thread_name = "evaluation"

    def __init__(self, run_dir: Path, config: SampleConfig, *, use_ema: bool = True,
                 device: torch.device | str = "cpu", classifier_dir: str | os.PathLike | None = None,
                 data_root: str | None = None, fit_config: FitConfig | None = None):
        super().__init__()
        self.run_dir, self.config = Path(run_dir), config
        self._use_ema, self._device = use_ema, resolve_device(device)
        self._classifier_dir, self._data_root, self._fit_config = classifier_dir, data_root, fit_config
        self._phase = "loading"
        self._done, self._total = 0, 0
        self._phase_started = self._started
        self._entry: dict[str, Any] | None = None
        self._setting = config.setting

    def _set_phase(self, phase: str, total: int = 0) -> None:
        with self._lock:
            self._phase, self._done, self._total = phase, 0, total
            self._phase_started = time.perf_counter()

    def _on_fit_step(self, done: int, total: int, loss: float) -> None:
        del loss
        with self._lock:
            self._done, self._total = done, total

    def _counted(self, steps, total: int, description: str):
        del description
        self._set_phase("sampling", total)
        try:
            for step in steps:
                yield step
                with self._lock:
                    self._done += 1
                if self.stop_requested:
                    return
            self._set_phase("scoring")  # features of the samples, the floor and the noise ceiling
        finally:
            steps.close()

    def work(self) -> None:
        loaded = runs.load_model(self.run_dir, use_ema=self._use_ema, device=self._device)
        scheduler = NoiseScheduler(loaded.config.schedule)
        steps = self.config.resolved_steps(scheduler.num_timesteps)
        raw_weights = not loaded.used_ema and (self.run_dir / "ema.safetensors").exists()
        with self._lock:
            self._setting = setting_name(self.config, steps, raw_weights)
        dataset = loaded.config.train.dataset
        if not classifier_ready(dataset, self._classifier_dir):
            self._set_phase("fitting classifier")
        classifier, _ = load_or_fit_classifier(dataset, self._classifier_dir, self._device, self._data_root,
                                               self._fit_config, progress=self._on_fit_step)
        if self.stop_requested:
            return self._finish("cancelled")
        self._set_phase("scoring")  # the test statistics, once per classifier
        evaluator = QualityEvaluator(classifier, load_images(dataset, "test", self._data_root), self._device)
        train = load_images(dataset, "train", self._data_root)
        entry = score_setting(self.config, loaded, scheduler, evaluator, train, raw_weights, self._device,
                              wrap=self._counted)
        if entry is None:
            return self._finish("cancelled")
        runs.append_eval(self.run_dir, entry)
        with self._lock:
            self._entry, self._setting = entry, entry["setting"]
        self._finish("finished")

    def _finish(self, state: str) -> None:
        with self._lock:
            self._state, self._phase = state, "done"
            self._ended = time.perf_counter()

    def snapshot(self) -> EvaluationStatus:
        with self._lock:
            now = time.perf_counter()
            end = self._ended if self._ended is not None else now
            eta = None
            if self._state == "running" and self._done and self._total:
                eta = (now - self._phase_started) / self._done * (self._total - self._done)
            return EvaluationStatus(self.run_dir.name, self._setting, self._state, self._phase, self._done,
                                    self._total, end - self._started, eta, self._error,
                                    dict(self._entry) if self._entry else None)


class EvaluationManager:
    """At most one running `EvaluationJob` per process (they share the CPU with training); the last
    one stays available so a page can show how it ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: EvaluationJob | None = None

    @property
    def job(self) -> EvaluationJob | None:
        with self._lock:
            return self._job

    def start(self, run_dir: str | os.PathLike, config: SampleConfig, **kwargs: Any) -> EvaluationJob:
        with self._lock:
            if self._job is not None and self._job.alive:
                raise JobBusy(f"run {self._job.run_dir.name!r} is being evaluated: one evaluation at a time. "
                              "Cancel it (or wait for it to finish) before starting another.")
            self._job = EvaluationJob(Path(run_dir), config, **kwargs)
            self._job.start()
            return self._job
