"""What a Fréchet distance means, and what each step of a sweep did: plain values for the pages.

**Verdicts.** A distance is placed between its two references taken at the same N with the same
classifier: the floor (real images) and the noise ceiling (never-denoised samples),

    position = (fd − floor) / (noise − floor)      0 = as good as real images, 1 = pure noise.

The ratio to the floor alone misleads at small N: a 1-step run at N = 64 scored 71.9 against a
ceiling of about 75 (position 0.95), yet read "5.4×" the floor, because the floor itself grows at
small N. The thresholds come from the shipped runs at N = 1000 (docs/results.md, docs/ablation.md):

- below 0.06, **close to real**: demo-improved-long (0.03), the guided run at γ = 3 (0.04), the
  35-minute demo with the SDE sampler (0.05); their grids read as clothes at a glance;
- below 0.5, **recognisable**: the book's network after 750 steps (0.35) up to the ablation's best
  steps (0.12); shapes and classes are clear, textures rough;
- from 0.5, **near noise**: a run stopped after a few steps (0.95).

**Spread.** Two runs whose configs differ only in the seed (same budget, same scoring) measure the
seed-to-seed spread: |fd_a − fd_b| / their mean (the shipped improved-lr-seed1 sweep repeats the
blog ablation's last step with seed 1: 9.34 against 11.4, about 20 %). A step's change smaller than
the spread is within noise; a sweep without such a pair is marked "single seed".
"""
from __future__ import annotations

import math

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Sequence

from core.config import RunConfig

CLOSE_TO_REAL = 0.06
NEAR_NOISE = 0.5
# Fields that do not change what a run learns: equal configs up to these (and the seed) are repeats.
NOT_RECIPE = ("seed", "device", "log_every", "checkpoint_every_s", "sample_every_epochs", "grid_sampler",
              "grid_steps", "channels_last")


def position(fd: float | None, floor: float | None, noise: float | None) -> float | None:
    """Where fd lies between the floor (0) and the noise ceiling (1); None without both references."""
    values = (fd, floor, noise)  # a table's missing cell is NaN, not None: both mean "not measured"
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or noise <= floor:
        return None
    return (fd - floor) / (noise - floor)


def verdict(fd: float | None, floor: float | None, noise: float | None) -> str:
    """"close to real", "recognisable" or "near noise" (thresholds: the module docstring); "" unknown."""
    where = position(fd, floor, noise)
    if where is None:
        return ""
    return "close to real" if where < CLOSE_TO_REAL else "recognisable" if where < NEAR_NOISE else "near noise"


def recipe(config: RunConfig) -> dict[str, Any]:
    """The config without what does not change what a run learns (the seed among them)."""
    train = replace(config.train, **{f: getattr(RunConfig().train, f) for f in NOT_RECIPE
                                     if hasattr(config.train, f)})
    return asdict(replace(config, train=train))


@dataclass(frozen=True)
class Repeat:
    """Two scored runs of one recipe with different seeds."""
    runs: tuple[str, str]
    fds: tuple[float, float]

    @property
    def spread(self) -> float:
        """|a − b| / mean: the relative seed-to-seed difference."""
        a, b = self.fds
        return abs(a - b) / ((a + b) / 2)


def seed_repeats(scored: Iterable[tuple[str, RunConfig, float, str]]) -> list[Repeat]:
    """Pairs among (run, config, fd, setting) with equal recipes and scoring setting but another seed."""
    seen: list[tuple[str, dict, float, str, int]] = []
    pairs = []
    for name, config, fd, setting in scored:
        mine = recipe(config)
        for other, theirs, other_fd, other_setting, seed in seen:
            if theirs == mine and other_setting == setting and seed != config.train.seed:
                pairs.append(Repeat((other, name), (other_fd, fd)))
        seen.append((name, mine, fd, setting, config.train.seed))
    return pairs


@dataclass(frozen=True)
class Effect:
    """One step of a sweep against the step before it."""
    index: int
    label: str
    fd: float | None
    delta: float | None       # relative change of fd from the row before (−0.42 = 42 % lower)
    within_noise: bool | None  # None: no seed repeat to say


def effects(rows: Sequence[dict[str, Any]], spread: float | None) -> list[Effect]:
    """Each scored row's change from the scored row before it, judged against the seed spread."""
    out, before = [], None
    for i, row in enumerate(rows):
        fd = row.get("fd")
        delta = (fd - before) / before if fd is not None and before else None
        noise = None if delta is None or spread is None else abs(delta) < spread
        out.append(Effect(i + 1, row["label"], fd, delta, noise))
        if fd is not None:
            before = fd
    return out


def spread_text(delta: float | None, within: bool | None, spread: float | None) -> str:
    if delta is None:
        return ""
    if spread is None:
        return "single seed"
    return f"within the ±{spread / 2:.0%} seed spread" if within else f"outside the ±{spread / 2:.0%} seed spread"


def reading(found: Sequence[Effect], spread: float | None) -> str:
    """A short generated reading: the changes that mattered, and the ones inside the noise."""
    moved = [e for e in found if e.delta is not None]
    if not moved:
        return "No two consecutive runs are scored yet."
    best = min(moved, key=lambda e: e.delta)
    worst = max(moved, key=lambda e: e.delta)
    parts = [f"The largest improvement is step {best.index}, {best.label} ({best.delta:+.0%})."]
    if worst.delta > 0:
        parts.append(f"Step {worst.index}, {worst.label}, made it worse ({worst.delta:+.0%}); a change can "
                     "hurt on its own and help with a later one (a path cannot see such interactions).")
    if spread is None:
        parts.append("Each run has one seed: without a repeat, small changes cannot be told from noise.")
    else:
        clear = [e for e in moved if not e.within_noise and e is not best and e is not worst]
        if clear:
            parts.append("Also outside the seed spread: " + ", ".join(f"step {e.index}, {e.label} ({e.delta:+.0%})"
                                                                      for e in clear) + ".")
        noise = [e for e in moved if e.within_noise]
        if noise:
            parts.append(f"Inside the seed-to-seed spread (about {spread:.0%} between two seeds), so not "
                         "measurable at this budget: " + ", ".join(f"step {e.index} ({e.delta:+.0%})" for e in noise)
                         + ".")
    return " ".join(parts)
