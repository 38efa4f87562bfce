"""The run queue's worker: `QueueRunner` claims the next entry of `queue.json`, trains it, scores it
at the queue's setting and records how it ended (the dashboard's worker thread and `queue run`)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import estimates, queue, sweeps
from ..store import runs
from ..data.datasets import ImageSet
from ..config import ConfigError
from ..errors import RunError
from ..train.training import Progress, train_run
from .background import BackgroundJob
from .evaluation_jobs import EvaluationJob, EvaluationStatus

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
            record_training_time(claim.run_dir, progress)
            if progress.state == "stopped":
                self._end(claim, "stopped", "stopped by the user; resume the queue to continue it", pause=True)
                return
            if claim.eval is None:  # a sweep's run: scored at its sweep's setting, the queue's stays off
                claim.eval = sweeps.queue_evaluation(self.runs_dir, name)
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


def record_training_time(run_dir: Path, progress: Progress) -> None:
    """This machine's step time for the run's network, for the next estimate (core.work.estimates)."""
    try:
        config = runs.load_config(run_dir)
    except (RunError, ConfigError, OSError):
        return
    estimates.record_training(run_dir, config.model, progress.device, config.train.batch_size,
                              config.data.shape)
