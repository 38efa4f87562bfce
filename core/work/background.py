"""The base of every background job: a daemon thread with stop / join / alive and a lock for its
report (`BackgroundJob`), the same with a state, an error and a clock (`ReportingJob`), and the
refusal when a process's one job slot is taken (`JobBusy`). Nothing here draws anything."""
from __future__ import annotations

import threading
import time
import traceback

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
        self._done, self._total = 0, 0  # here, not in subclasses: `_counted` counts into them
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


class JobBusy(RuntimeError):
    """A training job is already running; the message names it and what to do."""
