"""Background work: a training job, a sampling job, an evaluation job, the run queue's worker, and the
process-wide managers.

The dashboard keeps one `JobManager` per server process (in `st.cache_resource`), so a page
reload or a second browser tab sees the same running job. Nothing here draws anything: the UI
polls `snapshot()` copies, taken under a lock, and the worker threads make no UI calls.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..models import budget
from . import queue
from ..store import runs
from ..config import ConfigError, RunConfig, SampleConfig
from ..data.datasets import IMAGE_SHAPE, ImageSet, load_images
from ..device import resolve_device
from ..errors import RunError
from ..evaluation.classifier import FitConfig, classifier_path
from ..evaluation.frechet import QualityEvaluator
from ..evaluation.scoring import load_or_fit_classifier, score_setting, setting_name
from ..diffusion.sampling import SampleResult, collect, reverse_process, total_steps
from ..diffusion.schedule import NoiseScheduler
from ..train.training import Progress, train_run


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

    def _counted(self, steps):
        """Pass reverse-process steps through, counting them in `_done`, and end the iteration when
        cancelled."""
        try:
            for step in steps:
                yield step
                with self._lock:
                    self._done += 1
                if self.stop_requested:
                    return
        finally:
            steps.close()  # runs the reverse process's clean-up (the model's train/eval mode) now


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
                 prediction: str = "eps", shape: tuple[int, int, int] = IMAGE_SHAPE):
        super().__init__()
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

    def snapshot(self) -> SamplingStatus:
        with self._lock:
            end = self._ended if self._ended is not None else time.perf_counter()
            return SamplingStatus(self._state, self._done, self._total, end - self._started, self._error)


class JobBusy(RuntimeError):
    """A training job is already running; the message names it and what to do."""


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
    def queue_runner(self) -> "QueueRunner | None":
        with self._lock:
            return self._queue

    def ensure_queue_runner(self, runs_dir: str | os.PathLike, **kwargs: Any) -> "QueueRunner":
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
                         repeats: int = 2, shape: tuple[int, int, int] = IMAGE_SHAPE) -> float:
    """Seconds of one network evaluation per image at `batch` images (best of `repeats`)."""
    device = resolve_device(device)
    x = torch.randn(batch, *shape, device=device)
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

    def _sampling_phase(self, steps, total: int, description: str):
        """score_setting's step wrapper: the sampling phase, counted, then the scoring phase."""
        del description
        self._set_phase("sampling", total)
        yield from self._counted(steps)
        if not self.stop_requested:
            self._set_phase("scoring")  # features of the samples, the floor and the noise ceiling

    def work(self) -> None:
        loaded = runs.load_model(self.run_dir, use_ema=self._use_ema, device=self._device)
        scheduler = NoiseScheduler(loaded.config.schedule)
        steps = self.config.resolved_steps(scheduler.num_timesteps)
        raw_weights = not loaded.used_ema and (self.run_dir / "ema.safetensors").exists()
        with self._lock:
            self._setting = setting_name(self.config, steps, raw_weights)
        dataset = loaded.config.data.dataset
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
                              wrap=self._sampling_phase)
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


# -- the run queue ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueStatus:
    """What the queue worker is doing: idle, training or evaluating one entry, and its progress."""
    phase: str                          # idle, training, evaluating, ended
    entry: queue.Entry | None           # the entry being worked on
    training: Progress | None           # that run's training progress (kept while it is evaluated)
    evaluation: EvaluationStatus | None
    error: str | None                   # why the worker cannot go on (a damaged queue file), if so

    @property
    def active(self) -> bool:
        return self.phase in ("training", "evaluating")


class QueueRunner(BackgroundJob):
    """Works the queue file of a runs folder: `recover()` first, then claim the next entry, train it
    (`train_run(resume=True)`: a new run starts at step 0, a stopped one continues from its
    checkpoint), evaluate it when the queue has an eval setting (the dashboard's `EvaluationJob`,
    shipped classifier, entry appended to its eval.json), record how it ended, and go on.

    A run that fails is marked failed and the next one starts. `stop_current()` stops the current run
    (it checkpoints first), marks its entry stopped and pauses the queue. When nothing can start, the
    worker polls the file every `poll_s` seconds, so entries added by another process start too; with
    `exit_when_idle` (the CLI's `queue run`) it ends instead once nothing is queued or the queue is
    paused. A damaged queue file is reported in `snapshot().error` and polled until it is fixed.

    `guard` and `may_start` let a `JobManager` keep one run training per process: the claim happens
    under `guard`, and only when `may_start()` says no other job trains.
    """

    thread_name = "queue"

    def __init__(self, runs_dir: str | os.PathLike, *, images: ImageSet | None = None, data_root: str | None = None,
                 exit_when_idle: bool = False, poll_s: float = 1.0, guard: threading.Lock | None = None,
                 may_start: Callable[[], bool] | None = None, eval_device: torch.device | str = "auto",
                 classifier_dir: str | os.PathLike | None = None,
                 on_event: Callable[[str], None] | None = None):
        super().__init__()
        self.runs_dir = Path(runs_dir).resolve()
        self._images, self._data_root = images, data_root
        self._exit_when_idle, self._poll_s = exit_when_idle, poll_s
        self._guard = guard or threading.Lock()
        self._may_start = may_start
        self._eval_device, self._classifier_dir = eval_device, classifier_dir
        self._on_event = on_event
        self._claim: queue.Claim | None = None
        self._stop_current = threading.Event()
        self._phase = "idle"
        self._progress: Progress | None = None
        self._evaluation: EvaluationJob | None = None
        self._error: str | None = None

    # -- reporting --------------------------------------------------------------------------------------
    def _event(self, text: str) -> None:
        if self._on_event is not None:
            self._on_event(text)

    def _update(self, progress: Progress) -> None:
        copied = replace(progress, steps=list(progress.steps), losses=list(progress.losses))
        with self._lock:
            self._progress = copied

    def snapshot(self) -> QueueStatus:
        with self._lock:
            p, claim, job = self._progress, self._claim, self._evaluation
            phase, error = self._phase, self._error
        training = replace(p, steps=list(p.steps), losses=list(p.losses)) if p is not None else None
        return QueueStatus(phase, claim.entry if claim else None, training, job.snapshot() if job else None, error)

    @property
    def training_run(self) -> str | None:
        """The run this worker has claimed (training or being evaluated), else None."""
        with self._lock:
            return self._claim.entry.run if self._claim is not None else None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._phase, self._error = "ended", queue.describe_error(exc)

    # -- control ----------------------------------------------------------------------------------------
    def stop_current(self) -> bool:
        """Stop the entry being worked on (training checkpoints first; an evaluation is cancelled);
        it ends `stopped` and the queue pauses. False when nothing is being worked on."""
        with self._lock:
            if self._claim is None:
                return False
            self._stop_current.set()
            job = self._evaluation
        if job is not None:
            job.cancel()
        return True

    def stop(self) -> None:
        """End the worker: the current run is stopped (and its entry marked so), then the thread ends."""
        super().stop()
        self.stop_current()

    # -- the loop -------------------------------------------------------------------------------------------
    def _note_error(self, exc: BaseException | None) -> None:
        with self._lock:
            self._error = None if exc is None else str(exc)

    def _next_claim(self) -> queue.Claim | None:
        with self._guard:
            if self._may_start is not None and not self._may_start():
                return None
            claim = queue.claim_next(self.runs_dir)
            if claim is not None:
                with self._lock:
                    self._claim, self._phase, self._evaluation = claim, "training", None
                    self._progress = Progress(run_name=claim.entry.run, run_dir=str(claim.run_dir))
                    self._stop_current.clear()
            return claim

    def _idle_should_end(self) -> bool:
        if self._exit_when_idle:
            current = queue.read_queue(self.runs_dir)
            return current.paused or not current.queued
        return False

    def work(self) -> None:
        try:
            queue.recover(self.runs_dir)
        except queue.QueueDamaged as exc:
            self._note_error(exc)
        while not self.stop_requested:
            try:
                claim = self._next_claim()
                self._note_error(None)
                if claim is None:
                    if self._idle_should_end():
                        break
                    self._stop.wait(self._poll_s)
                    continue
                self._work_on(claim)
            except queue.QueueDamaged as exc:  # reported, polled until the user fixes or deletes the file
                self._note_error(exc)
                if self._exit_when_idle:
                    raise
                self._stop.wait(self._poll_s)
        with self._lock:
            self._phase = "ended"

    def _work_on(self, claim: queue.Claim) -> None:
        name = claim.entry.run
        self._event(f"training {name} (entry {claim.entry.id})")
        try:
            try:
                progress = train_run(claim.run_dir, resume=True, images=self._images, data_root=self._data_root,
                                     on_progress=self._update, stop_event=self._stop_current)
            except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the queue goes on
                self._update_error(exc)
                self._end(claim, "failed", queue.describe_error(exc))
                return
            if progress.state == "stopped":
                self._end(claim, "stopped", "stopped by the user; resume the queue to continue it", pause=True)
                return
            if claim.eval is not None:
                state, error = self._evaluate(claim)
                self._end(claim, state, error, pause=state == "stopped")
                return
            self._end(claim, "finished", None)
        finally:
            claim.release()  # also on an unexpected error: the worker lock never outlives the entry
            with self._lock:
                self._claim, self._phase = None, "idle"  # the last progress stays, to show how it ended

    def _update_error(self, exc: BaseException) -> None:
        with self._lock:
            if self._progress is not None and self._progress.state != "failed":
                self._progress = replace(self._progress, state="failed", error=queue.describe_error(exc))

    def _evaluate(self, claim: queue.Claim) -> tuple[str, str | None]:
        """Score the just-trained run at the queue's setting; (entry state, error)."""
        with self._lock:
            self._phase = "evaluating"
        self._event(f"evaluating {claim.entry.run} ({claim.eval.label})")
        try:
            # Held while scoring, so nobody resumes (or deletes) the run under the evaluation.
            lock = runs.RunLock(claim.run_dir).acquire()
        except RunError as exc:
            return "failed", f"trained, but not evaluated: {exc}"
        try:
            job = EvaluationJob(claim.run_dir, claim.eval.sample_config(), device=self._eval_device,
                                classifier_dir=self._classifier_dir, data_root=self._data_root)
            with self._lock:
                self._evaluation = job
            if self._stop_current.is_set():
                job.cancel()
            job.start()
            job.join()
            status = job.snapshot()
        finally:
            lock.release()
        if status.state == "finished":
            return "finished", None
        if status.state == "cancelled":
            return "stopped", "trained; its evaluation was stopped (resume the queue to evaluate it)"
        return "failed", f"trained, but the evaluation failed: {status.error}"

    def _end(self, claim: queue.Claim, state: str, error: str | None, pause: bool = False) -> None:
        queue.finish(self.runs_dir, claim, state, error, pause_queue=pause)
        self._event(f"{state} {claim.entry.run}" + (f": {error}" if error else ""))
