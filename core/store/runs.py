"""Run folders: one folder per training run under a runs directory (default `checkpoints/`).

Layout of `checkpoints/<name>/`:
    config.json          RunConfig (+ format_version): rebuilds model, schedule and optimizer
    model.safetensors    weights (metadata: step, epoch)
    ema.safetensors      EMA weights, when EMA is on
    optimizer.safetensors  optimizer tensors; its scalars and param groups as JSON metadata,
                         so loading never unpickles anything
    checkpoint.json      the manifest of the last complete checkpoint: step, epoch, elapsed_s and
                         the sha256 and size of each tensor file (see `checkpoint`)
    previous/            the checkpoint before it, to fall back to when the newest is torn
    state.json           step, epoch, elapsed_s of the last checkpoint (for older readers)
    status.json          state (running / finished / stopped / failed), pid, error
    .lock                held (flock) by the process training the run, for as long as it trains
    metrics.csv          step, epoch, loss, lr, elapsed_s, images_per_s
    samples/             a preview grid per epoch (epoch_001.png, ...) and final.png
    eval.json            evaluation entries, once evaluated
Every file is written atomically (temporary file in the same folder, then rename), so a crash
leaves the previous version, never half a file. A run folder may come from someone else, so
every file is read through `io.read_bounded_bytes` (regular files only, size-limited, never
through a symlink) and every value is range-checked: damage becomes a `RunError` for that run
alone, and the list shows it as *damaged* with the reason.
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import budget
from . import checkpoint
from ..config import ConfigError, RunConfig, check_run_name, run_label
from ..device import resolve_device
from ..errors import RunError
from .io import (MAX_JSON_BYTES, MAX_METRICS_BYTES, atomic_write_text, is_disk_full,
                 load_weights_bytes, open_folder, overwrite_in_place, read_bounded_bytes, read_json_file)
from ..models import build_model
from .evals import append_eval, read_eval  # noqa: F401 - runs.append_eval / runs.read_eval for callers

DEFAULT_RUNS_DIR = Path(os.environ.get("DDPM_RUNS_DIR", "checkpoints"))
METRIC_FIELDS = ("step", "epoch", "loss", "lr", "elapsed_s", "images_per_s")
LOCK_FILE = ".lock"
SWEEPS_FOLDER = "sweeps"  # <runs>/sweeps/<name>/ holds the sweeps (core.sweeps); never a run
QUEUE_FILE = "queue.json"  # <runs>/queue.json is the run queue (core.work.queue); never a run
RESERVED_NAMES = (SWEEPS_FOLDER, QUEUE_FILE)
STATES = ("created", "running", "finished", "stopped", "failed", "interrupted")
RESUMABLE_STATES = ("stopped", "interrupted", "failed")  # a finished run resumes too, given a longer limit


# -- paths -------------------------------------------------------------------------
def run_path(runs_dir: str | os.PathLike, name: str) -> Path:
    """The folder of run `name`, guaranteed to lie directly inside `runs_dir`."""
    check_run_name(name)
    root = Path(runs_dir).resolve()
    # The name itself is not resolved: a run name planted as a link to a sibling run must be seen as
    # a link (and refused by every reader and writer), not silently become that sibling.
    path = root / name
    if path.parent != root:  # defence in depth; check_run_name already forbids '/' and '..'
        raise ConfigError(f"name = {name!r} is not allowed: it leaves the runs folder {root}")
    if path.is_symlink():
        target = path.resolve()
        raise ConfigError(f"name = {name!r} is not allowed: " + (
            f"it is a link to the run {target.name!r}; use that name" if target.parent == root and
            is_run_folder(target, root) else f"it is a link that leaves the runs folder {root}"))
    return path


def is_run_folder(path: Path, root: Path) -> bool:
    """A real folder directly inside `root`: a symlink (to a folder elsewhere, or to another run)
    is not a run, so nothing that lists, resumes or bundles runs ever writes or reads through it."""
    try:
        return not path.is_symlink() and path.is_dir() and path.resolve().parent == root.resolve()
    except OSError:
        return False


# -- config ------------------------------------------------------------------------------------------
def create_run(runs_dir: str | os.PathLike, name: str, config: RunConfig) -> Path:
    """Make a new run folder with its config; refuses to overwrite an existing run."""
    path = run_path(runs_dir, name)
    if name in RESERVED_NAMES:
        raise ConfigError(f"name = {name!r} is not allowed: the runs folder keeps its "
                          f"{'sweeps' if name == SWEEPS_FOLDER else 'run queue'} there; pick another name")
    if os.path.lexists(path):  # a dangling link counts: mkdir would follow it out of the runs folder
        raise ConfigError(f"name = {name!r} is not allowed: a run of that name exists in {path.parent}; "
                          "pick another name, or resume it with --resume")
    path.mkdir(parents=True)
    (path / "samples").mkdir()
    atomic_write_text(path / "config.json", config.to_json())
    write_status(path, "created")
    return path


def load_config(path: Path) -> RunConfig:
    if path.is_symlink() or not path.is_dir():
        raise RunError(f"run {path.name!r}: no such run folder {path}")
    if not os.path.lexists(path / "config.json"):
        raise RunError(f"run {path.name!r}: config.json is missing (the folder may be empty or "
                       "not a run); delete the folder or restore its config.json")
    data = read_bounded_bytes(path / "config.json", MAX_JSON_BYTES, path.name)
    try:
        return RunConfig.from_json(data.decode("utf-8"))
    except ConfigError as exc:
        raise RunError(f"run {path.name!r}: {exc}") from None
    except UnicodeDecodeError:
        raise RunError(f"run {path.name!r}: config.json is not text") from None


# -- the run lock ------------------------------------------------------------------------------------
class RunBusy(RunError):
    """Another process (or job) is training the run."""


class RunLock:
    """An exclusive `flock` on `<run>/.lock`, held by whoever trains the run for the whole job.

    The kernel drops it when the process dies, however it dies, so a held lock means a live
    trainer and nothing else does: no pid guesses, no heartbeats. flock locks belong to an open
    file, so a second job in the same process (the dashboard) is refused like another process.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        name, path = self.run_dir.name, self.run_dir / LOCK_FILE
        # The run folder is opened first without following a link: a run name planted as a link to
        # a folder elsewhere must not get that folder's .lock created, truncated or written.
        folder = open_folder(self.run_dir)
        try:
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644,
                         dir_fd=folder)
        except OSError as exc:
            raise RunError(f"run {name!r}: {LOCK_FILE} cannot be opened ({exc.strerror}); delete it if it is "
                           "not a regular file") from None
        finally:
            os.close(folder)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RunError(f"run {name!r}: {LOCK_FILE} is not a regular file; delete it")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunBusy(busy_message(self.run_dir)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # who holds it, for the message above
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(lock_path: Path) -> str:
    try:
        pid = read_bounded_bytes(lock_path, 32, lock_path.parent.name).decode("ascii").strip()
        return f"pid {int(pid)}"
    except (RunError, ValueError):
        return "another process"


def busy_message(run_dir: Path) -> str:
    return (f"run {run_dir.name!r} is still training ({_holder(run_dir / LOCK_FILE)}); stop it (or wait for it "
            "to finish) before resuming or deleting it")


def refuse_if_locked(run_dir: Path) -> None:
    """RunBusy when a trainer holds the run's lock now; looks without taking it (or creating the file)."""
    if is_locked(run_dir):
        raise RunBusy(busy_message(run_dir))


def is_locked(run_dir: Path) -> bool:
    """Whether a trainer holds the run's lock right now (never creates the lock file)."""
    return lock_file_held(run_dir / LOCK_FILE)


def lock_file_held(path: Path) -> bool:
    """Whether some process holds an flock on `path` now; looks without taking it or creating the
    file, and never through a link (a missing or planted file counts as not held)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# -- status ------------------------------------------------------------------------------------------
def write_status(path: Path, state: str, **extra: Any) -> None:
    status = {"state": state, "pid": os.getpid(), "updated_at": time.time(), **extra}
    data = json.dumps(status).encode("utf-8")
    try:
        atomic_write_text(path / "status.json", data.decode("utf-8"))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # No room for the temporary copy: the old status.json's own block still takes the new one,
        # so a run that fails for a full disk still says so.
        overwrite_in_place(path / "status.json", data)


def read_status(path: Path) -> dict[str, Any]:
    """The run's status. "running" means a live trainer holds the run's lock; a run whose status
    says running without one was killed, and is reported as interrupted. Raises RunError when
    status.json is hostile (not a regular file, oversized, not an object)."""
    run = path.name
    status = read_json_file(path / "status.json", MAX_JSON_BYTES, run, missing_ok=True)
    if status is None:
        status = {"state": "interrupted" if checkpoint.exists(path) else "created"}
    if not isinstance(status, dict):
        raise RunError(f"run {run!r}: status.json is not a JSON object")
    if is_locked(path):
        status["state"] = "running"
    elif status.get("state") == "running":
        status["state"] = "interrupted"
    return status


def _number(value: Any, default: float = 0.0) -> float:
    """A number read from a run's JSON files; anything else (damage, hand edits) is the default."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    number = float(value) if abs(value) < 1e300 else math.inf
    return number if math.isfinite(number) else default  # NaN and inf are damage too


# -- metrics -----------------------------------------------------------------------------------------
class MetricsWriter:
    """Appends rows to metrics.csv, flushing each, so a killed run keeps every logged row."""

    def __init__(self, path: Path):
        self.path = path
        # O_NOFOLLOW: a metrics.csv planted as a symlink is never appended through to its target.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise RunError(f"run {path.parent.name!r}: metrics.csv is not a regular file; delete it")
        new = info.st_size == 0
        self._fh = open(fd, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        if new:
            self._writer.writerow(METRIC_FIELDS)
            self._fh.flush()

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow([_fmt(row[k]) for k in METRIC_FIELDS])
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_metrics(path: Path, run: str | None = None) -> list[dict[str, float]]:
    """Rows of metrics.csv as dicts of finite floats. A torn last line (killed mid-write) and rows
    out of range (a step that is not a whole number in 0..checkpoint.MAX_STEP) are skipped; a file
    that is not a regular file or is over its size limit is a RunError."""
    file = path / "metrics.csv" if path.is_dir() else path
    data = read_bounded_bytes(file, MAX_METRICS_BYTES, run or file.parent.name, missing_ok=True)
    if data is None:
        return []
    rows = []
    # errors="replace": a garbled file yields unparsable rows (skipped), not an exception that
    # would take the whole run list down with it.
    lines = io.StringIO(data.decode("utf-8", errors="replace"), newline="")
    try:
        for row in csv.DictReader(lines):
            try:
                values = {k: float(row[k]) for k in METRIC_FIELDS}
            except (TypeError, ValueError, KeyError):
                continue
            if _valid_row(values):
                rows.append(values)
    except csv.Error:
        pass  # keep the rows read before the damage
    return rows


def _valid_row(row: dict[str, float]) -> bool:
    if not all(math.isfinite(v) for v in row.values()):
        return False
    return all(row[k].is_integer() and 0 <= row[k] <= checkpoint.MAX_STEP for k in ("step", "epoch"))


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop rows logged after the checkpoint a resumed run restarts from (they will be redone)."""
    file = path / "metrics.csv"
    rows = [r for r in read_metrics(file, path.name) if r["step"] <= max_step]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(METRIC_FIELDS)
    for r in rows:
        writer.writerow([_fmt(int(r[k])) if k in ("step", "epoch") else _fmt(r[k]) for k in METRIC_FIELDS])
    atomic_write_text(file, buf.getvalue())


# -- listing -----------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    name: str
    path: Path
    config: RunConfig | None
    state: str
    step: int = 0
    epoch: int = 0
    last_loss: float | None = None
    error: str | None = None          # the run's own failure message, or why it cannot be read
    readable: bool = True
    updated_at: float = 0.0
    evals: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None       # the newest checkpoint is unusable and previous/ is used: why

    @property
    def label(self) -> str:
        if self.config is None:
            return f"{self.name} (unreadable)"
        return f"{self.name} · {run_label(self.config)}"


def run_info(path: Path) -> RunInfo:
    """Everything the run list shows; never raises for a damaged run: the damage of any file is
    confined to this run, listed as damaged with the reason."""
    name = path.name
    try:
        config = load_config(path)
    except RunError as exc:
        return RunInfo(name, path, None, "damaged", error=str(exc), readable=False)
    try:
        return _run_info(path, config)
    except RunError as exc:
        # A hostile side file: the pages offer nothing on the run (readable=False) but say why; the
        # weights may still open with `load_model`, which reads none of these files.
        return RunInfo(name, path, config, "damaged", error=str(exc), readable=False)
    except (OSError, ValueError, RecursionError, OverflowError, MemoryError) as exc:  # never the whole list
        return RunInfo(name, path, config, "damaged", error=f"run {name!r}: cannot be read ({type(exc).__name__})",
                       readable=False)


def _run_info(path: Path, config: RunConfig) -> RunInfo:
    name = path.name
    status = read_status(path)
    saved, fallback = checkpoint.listed(path, name)
    metrics = read_metrics(path, name)
    state = status.get("state", "created")
    error = status.get("error")
    info = RunInfo(
        name=name, path=path, config=config, state=state if state in STATES else "damaged",
        step=saved["step"] if saved else 0, epoch=saved["epoch"] if saved else 0,
        last_loss=metrics[-1]["loss"] if metrics else None,
        error=None if error is None else str(error)[:2000], updated_at=_number(status.get("updated_at")),
        evals=read_eval(path), meta=saved["meta"] if saved else {}, fallback=fallback,
    )
    if info.state == "damaged" and info.error is None:
        info.error = f"run {name!r}: status.json holds an unknown state {str(state)[:40]!r}"
    if info.state == "finished" and not checkpoint.exists(path):
        info.state, info.readable = "damaged", False
        info.error = f"run {name!r}: model.safetensors is missing"
    # A run killed before its first checkpoint lists as interrupted at step 0 and resumes from scratch.
    return info


def list_runs(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> list[RunInfo]:
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    infos = [run_info(p) for p in sorted(root.iterdir()) if not p.name.startswith(".") and p.name not in RESERVED_NAMES
             and is_run_folder(p, root)]
    return sorted(infos, key=lambda i: (-i.updated_at, i.name))


def delete_run(runs_dir: str | os.PathLike, name: str) -> None:
    path = run_path(runs_dir, name)
    if not path.is_dir():
        raise RunError(f"run {name!r}: no such run folder {path}")
    with RunLock(path):  # refuses a run being trained, and keeps a resume from starting meanwhile
        shutil.rmtree(path)


# -- rebuilding a trained model ----------------------------------------------------------------------
@dataclass
class LoadedRun:
    name: str
    path: Path
    config: RunConfig
    model: nn.Module
    used_ema: bool
    fallback: str | None = None  # the previous checkpoint was loaded: why (callers say it out loud)


def load_model(path: Path, use_ema: bool = True, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild a run's network from config.json and its (EMA, when present) weights, in eval mode.

    The network must fit this machine (`budget`) before it is built, and the weights must match the
    checkpoint's manifest (sha256) and be finite; a torn newest checkpoint falls back to the one before.
    """
    path = Path(path)
    device = resolve_device(device)  # a missing GPU is a ConfigError naming the device
    config = load_config(path)
    try:
        budget.check_sampling_fits(config.model, 1, device, image_size=config.data.image_size)
    except ConfigError as exc:
        raise RunError(f"run {path.name!r}: {exc}") from None
    found = checkpoint.latest_weights(path, path.name, use_ema)
    if found is None:
        raise RunError(f"run {path.name!r}: model.safetensors is missing (the run has no checkpoint yet)")
    name, data, fallback = found
    model = build_model(config.model)
    load_weights_bytes(data, name, model, path.name)
    model.to(device).eval()
    return LoadedRun(path.name, path, config, model, name == "ema.safetensors", fallback)
