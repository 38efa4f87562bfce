"""What a command needs while it trains in the foreground: Ctrl-C / SIGTERM as a clean stop, and a
progress bar fed by the training loop's Progress reports. Shared by `train`, `sweep` and `queue run`."""
from __future__ import annotations

import signal
import sys
import threading

from tqdm import tqdm

# The shell's convention for a process ended by a signal: 128 + its number (Ctrl-C 130, SIGTERM 143).
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
EXIT_USAGE = 2   # a bad input, said in one line
EXIT_FAILED = 1  # the work itself failed (a run diverged, the disk filled, a sweep's run failed)


class StopOnSignals:
    """While training, SIGINT (Ctrl-C) and SIGTERM stop the run as the dashboard's Stop button
    does: the loop finishes its step, checkpoints, marks the run stopped; the command then exits
    130 or 143. A second signal is handled the same way (the checkpoint is already under way)."""

    def __init__(self):
        self.event = threading.Event()
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint",
                  file=sys.stderr)
        self.event.set()

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in EXIT_SIGNAL:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class ProgressBar:
    """tqdm over steps, updated from the loop's Progress reports."""

    def __init__(self):
        self._tqdm = tqdm(total=None, unit="step", dynamic_ncols=True)
        self._last = 0

    def update(self, progress) -> None:
        if progress.total_steps and self._tqdm.total != progress.total_steps:
            self._tqdm.total = progress.total_steps
            self._tqdm.refresh()
        if progress.step > self._last:
            self._tqdm.update(progress.step - self._last)
            self._last = progress.step
        if progress.losses:
            self._tqdm.set_postfix(epoch=progress.epoch, loss=f"{progress.losses[-1]:.4f}",
                                   img_s=f"{progress.images_per_s:.0f}", refresh=False)
        if progress.message:
            self._tqdm.set_description(progress.message)
        else:
            self._tqdm.set_description("train")

    def close(self) -> None:
        self._tqdm.close()
