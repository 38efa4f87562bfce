"""Time estimates for long actions, from this machine's own recent work.

Every sampling, evaluation and training job records what one step cost it (seconds per step of
one batch, for that network, device, sampler and batch size) in `<runs>/timings.json`. An estimate
then looks up, in order of how well it fits:

1. the same network, device, sampler and batch: its step time × the steps to run;
2. the same network and device at another batch or sampler: per image and network evaluation
   (a forward pass costs the same whichever sampler asks for it; on these small images the time
   grows about linearly with the batch);
3. for training only, sampling records of the same network (a training step is one forward and
   one backward pass, about TRAIN_PER_FORWARD forwards), and the other way round;
4. the calibrated fallback before any work has run: a forward pass of the network timed here,
   after warm-up calls (the first calls of a network allocate and, on a GPU, pick kernels:
   timing them made the old estimates 10 to 45 times too high).

The file may be damaged or hostile like any file in the runs folder: it is read bounded, and
every entry is range-checked; a bad one is skipped, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..device import resolve_device
from ..errors import RunError
from ..store.io import atomic_write_text, read_json_file
from ..store.runs import read_metrics

TIMINGS_FILE = "timings.json"
MAX_TIMINGS_BYTES = 256 << 10
MAX_ENTRIES = 200                   # one per (kind, network, device, sampler, batch); the oldest go first
KINDS = ("sample", "train")
MAX_STEP_S = 3600.0                 # a step slower than an hour is not a measurement of this workbench
MIN_MEASURED_S = 0.05               # shorter jobs say more about timer noise than about the network
TRAIN_PER_FORWARD = 3.0             # backward ≈ 2 forwards (Kaplan et al.; core bench's FLOP counts agree)
CLASSIFIER_FIT_S = 180.0            # fitting the FashionMNIST classifier once on 2 CPU cores
SCORING_S = 5.0                     # test-set statistics (cached after the first time) and features
SCORING_S_PER_IMAGE = 0.002


BUILTIN_SHAPE = (1, 28, 28)


def network_key(config: ModelConfig, shape: tuple[int, int, int] = BUILTIN_SHAPE) -> str:
    """A short name for one network architecture (its config) at one image shape (C, H, W), the same in
    every process; the built-in 28x28x1 shape keeps the key it always had."""
    text = json.dumps(asdict(config), sort_keys=True, default=str)
    if tuple(shape) != BUILTIN_SHAPE:
        text += json.dumps(list(shape))
    return f"{config.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Work:
    """What one timing is of: a step of `batch` images through `network` on `device`."""
    kind: str        # "sample" (one reverse step) or "train" (one optimiser step)
    network: str     # network_key(...)
    device: str      # "cpu", "cuda", "mps": the device type
    batch: int
    sampler: str = ""  # for sampling: ddpm, ddim, dpmpp2m, ...; "+cfg" appended when guidance doubles the calls


def timings_path(runs_dir: str | os.PathLike) -> Path:
    return Path(runs_dir) / TIMINGS_FILE


def _valid(entry: object) -> dict | None:
    """The entry if every field is of the right type and in range, else None."""
    if not isinstance(entry, dict):
        return None
    kind, network, device = entry.get("kind"), entry.get("network"), entry.get("device")
    sampler, batch, step_s, at = entry.get("sampler", ""), entry.get("batch"), entry.get("step_s"), entry.get("at")
    if kind not in KINDS or not all(isinstance(v, str) and 0 < len(v) <= 64 for v in (network, device)):
        return None
    if not isinstance(sampler, str) or len(sampler) > 32:
        return None
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 100_000:
        return None
    if isinstance(step_s, bool) or not isinstance(step_s, (int, float)) or not 0 < step_s <= MAX_STEP_S:
        return None
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return None
    return {"kind": kind, "network": network, "device": device, "sampler": sampler, "batch": batch,
            "step_s": float(step_s), "at": float(at)}


def read_timings(runs_dir: str | os.PathLike) -> list[dict]:
    """The valid entries of the timings file, newest first; [] when it is missing or unreadable."""
    try:
        data = read_json_file(timings_path(runs_dir), MAX_TIMINGS_BYTES, TIMINGS_FILE, missing_ok=True)
    except (RunError, OSError):
        return []  # a damaged file costs the estimates their history, nothing else
    raw = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        return []
    entries = [e for e in (_valid(item) for item in raw[:MAX_ENTRIES]) if e is not None]
    return sorted(entries, key=lambda e: -e["at"])


def record(runs_dir: str | os.PathLike, work: Work, seconds: float, steps: int) -> bool:
    """Remember that `steps` steps of `work` took `seconds`; False (nothing written) when the
    measurement is too short to mean anything or the folder cannot be written."""
    if steps <= 0 or not seconds >= MIN_MEASURED_S:
        return False
    entry = _valid(dict(asdict(work), step_s=seconds / steps, at=time.time()))
    folder = Path(runs_dir)
    if entry is None or not folder.is_dir():
        return False
    same = ("kind", "network", "device", "sampler", "batch")
    kept = [e for e in read_timings(folder) if any(e[k] != entry[k] for k in same)]
    entries = [entry] + kept[:MAX_ENTRIES - 1]
    try:
        atomic_write_text(timings_path(folder), json.dumps({"entries": entries}, indent=1))
    except OSError:
        return False  # estimates are a convenience: a full disk must not fail the job that measured
    return True


def _per_image_forward_s(entry: dict) -> float:
    """Seconds of one network forward pass per image, from a recorded step."""
    calls = 2.0 if entry["sampler"].endswith("+cfg") else 1.0
    forwards = TRAIN_PER_FORWARD if entry["kind"] == "train" else calls
    return entry["step_s"] / entry["batch"] / forwards


def step_seconds(entries: list[dict], work: Work) -> float | None:
    """Seconds per step of `work` from the recorded entries (newest first), or None without any of
    this network on this device."""
    mine = [e for e in entries if e["network"] == work.network and e["device"] == work.device]
    for e in mine:
        if e["kind"] == work.kind and e["sampler"] == work.sampler and e["batch"] == work.batch:
            return e["step_s"]
    # Prefer the same kind (and sampler), then the nearest batch: per-image cost varies with batch size.
    ranked = sorted(mine, key=lambda e: (e["kind"] != work.kind, e["sampler"] != work.sampler,
                                         abs(e["batch"] - work.batch)))
    if not ranked:
        return None
    calls = 2.0 if work.sampler.endswith("+cfg") else 1.0
    forwards = TRAIN_PER_FORWARD if work.kind == "train" else calls
    return _per_image_forward_s(ranked[0]) * work.batch * forwards


def measure_forward_seconds(model: nn.Module, batch: int, device: torch.device | str = "cpu",
                            warmup: int = 2, repeats: int = 5, shape: tuple[int, int, int] = BUILTIN_SHAPE) -> float:
    """Seconds of one forward pass of `batch` images of `shape`, after `warmup` untimed calls: the median
    of `repeats` (on a shared machine the best one is the luckiest, not the typical one)."""
    device = resolve_device(device)
    x = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 1, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    timed: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                model(x, t)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    timed.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return sorted(timed)[len(timed) // 2]


@dataclass(frozen=True)
class Estimate:
    seconds: float
    source: str      # "measured" (this work was recorded), "scaled" (from related records), "calibrated"

    @property
    def note(self) -> str:
        return {"measured": "from this machine's recent runs of the same work",
                "scaled": "scaled from this machine's recent work with this network",
                "calibrated": "from a timed forward pass; refined once this work has run here"}[self.source]


def estimate_steps(entries: list[dict], work: Work, steps: int,
                   calibrate: Callable[[int], float] | None = None) -> Estimate | None:
    """`steps` steps of `work`; `calibrate(batch)` times one forward pass when nothing is recorded
    (None then gives no estimate)."""
    exact = any(e["network"] == work.network and e["device"] == work.device and e["kind"] == work.kind
                and e["sampler"] == work.sampler and e["batch"] == work.batch for e in entries)
    per_step = step_seconds(entries, work)
    if per_step is not None:
        return Estimate(per_step * steps, "measured" if exact else "scaled")
    if calibrate is None:
        return None
    calls = 2.0 if work.sampler.endswith("+cfg") else 1.0
    forwards = TRAIN_PER_FORWARD if work.kind == "train" else calls
    return Estimate(calibrate(work.batch) * forwards * steps, "calibrated")


def sampling_batches(n: int, batch_size: int) -> list[int]:
    """The batch sizes `reverse_process` runs `n` images in."""
    full, rest = divmod(n, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def estimate_sampling(entries: list[dict], network: str, device: str, sampler: str, steps: int, n: int,
                      batch_size: int, calibrate: Callable[[int], float] | None = None) -> Estimate | None:
    """Sampling `n` images at `steps` network steps per batch."""
    total, sources = 0.0, set()
    for batch in sampling_batches(n, batch_size):
        one = estimate_steps(entries, Work("sample", network, device, batch, sampler), steps, calibrate)
        if one is None:
            return None
        total += one.seconds
        sources.add(one.source)
    worst = next(s for s in ("calibrated", "scaled", "measured") if s in sources)
    return Estimate(total, worst)


def estimate_evaluation(sampling: Estimate, n: int, classifier_ready: bool) -> Estimate:
    """An evaluation: its sampling, the scoring, and fitting the classifier when it is missing."""
    extra = SCORING_S + n * SCORING_S_PER_IMAGE + (0.0 if classifier_ready else CLASSIFIER_FIT_S)
    return Estimate(sampling.seconds + extra, sampling.source)


def training_step_seconds(rows: list[dict[str, float]], window: int = 20) -> float | None:
    """Seconds per optimiser step over the last `window` logged rows of a run's metrics.csv (a
    steady figure: the first rows carry the start-up, and one row's clock is too coarse)."""
    timed = [r for r in rows if "elapsed_s" in r and "step" in r]
    if len(timed) < 2:
        return None
    first, last = timed[max(0, len(timed) - 1 - window)], timed[-1]
    steps, seconds = last["step"] - first["step"], last["elapsed_s"] - first["elapsed_s"]
    if steps <= 0 or not 0 < seconds <= MAX_STEP_S * steps:
        return None  # a resumed run's clock restarting, or a damaged file: not a measurement
    return seconds / steps


def record_training(run_dir: str | os.PathLike, model: ModelConfig, device: str, batch: int,
                    shape: tuple[int, int, int] = BUILTIN_SHAPE) -> bool:
    """Record a just-trained run's steady step time (from its metrics.csv) in the runs folder."""
    run_dir = Path(run_dir)
    try:
        rows = read_metrics(run_dir)
    except (RunError, OSError):
        return False
    step_s = training_step_seconds(rows)
    if step_s is None:
        return False
    work = Work("train", network_key(model, shape), (device or "cpu").split(":")[0], batch)  # "cuda:0" -> "cuda"
    return record(run_dir.parent, work, step_s * 100, 100)  # seconds for 100 steps at that pace
