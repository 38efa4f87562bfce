"""What a training job reports (`Progress`) and the ways it ends early (divergence, full disk, stop).

A module of its own so the loop, the trainer, the background jobs and the dashboard share these
names without importing the loop itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..store import checkpoint
from ..store.io import is_disk_full


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class DiskFull(RuntimeError):
    """The disk (or quota) filled up while the run was writing; the last complete checkpoint stands."""


class StopRequested(Exception):
    """Raised inside the loop when stop() was called; the loop saves and ends cleanly."""


@dataclass
class Progress:
    """What a job reports; copied out under a lock, so readers never see a half-updated one."""
    state: str = "starting"            # starting, running, stopping, finished, stopped, failed
    run_name: str = ""
    run_dir: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    error: str | None = None
    latest_grid: str | None = None
    device: str = ""
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")


ProgressFn = Callable[[Progress], None]


def eta_seconds(progress: Progress, budget_s: float, global_batch: int) -> float | None:
    """Seconds left: by the step count at the current speed, or by the time budget, whichever is sooner."""
    candidates = []
    if progress.total_steps and progress.images_per_s > 0:
        candidates.append((progress.total_steps - progress.step) * global_batch / progress.images_per_s)
    if budget_s:
        candidates.append(max(0.0, budget_s - progress.elapsed_s))
    return min(candidates) if candidates else None


def divergence_message(symptom: str, step: int, config: RunConfig) -> str:
    """One line: what went non-finite, at which step, and the likely cause for this config."""
    decay = config.train.lr * config.train.weight_decay
    if config.train.optimizer == "adamw" and decay > 1:
        # AdamW multiplies the weights by (1 - lr·wd) each step: past 1 that factor flips their sign,
        # past 2 it grows them geometrically until they overflow.
        hint = (f"lr × weight_decay = {decay:g} > 1, so AdamW's decoupled decay multiplies the weights by "
                f"{1 - decay:g} every step and they blow up; lower lr or weight_decay (e.g. 2e-3 and 0.01)")
    else:
        hint = (f"the learning rate ({config.train.lr:g}) is probably too high; try 10x lower"
                if config.train.lr > 3e-3 else
                "try a lower learning rate or gradient clipping (--grad-clip 1.0)")
    return f"{symptom} at step {step}: training diverged; {hint}"


def as_reported(exc: BaseException, run_dir: Path) -> BaseException:
    """A full disk (ENOSPC, EDQUOT, EFBIG) becomes DiskFull with what to do; every other error stays itself."""
    if not is_disk_full(exc):
        return exc
    folder = Path(exc.filename).parent if getattr(exc, "filename", None) else run_dir
    kept = ("the last complete checkpoint is kept" if checkpoint.exists(run_dir) else
            "the run had no checkpoint yet, so it starts over")  # never claim one that does not exist
    return DiskFull(f"disk full in {folder} ({exc.strerror}); {kept}: free some space, then resume the run")
