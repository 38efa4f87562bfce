"""Run folders: one folder per training run under a runs directory (default `checkpoints/`).

Layout of `checkpoints/<name>/`:
    config.json          RunConfig (+ format_version): rebuilds model, schedule and optimizer
    model.safetensors    weights (metadata: step, epoch)
    ema.safetensors      EMA weights, when EMA is on
    optimizer.safetensors  optimizer tensors; its scalars and param groups as JSON metadata,
                         so loading never unpickles anything
    state.json           step, epoch, elapsed_s of the last checkpoint
    status.json          state (running / finished / stopped / failed), pid, heartbeat, error
    metrics.csv          step, epoch, loss, lr, elapsed_s, images_per_s
    samples/             a preview grid per epoch (epoch_001.png, ...) and final.png
    eval.json            evaluation entries, once evaluated
Every file is written atomically (temporary file in the same folder, then rename), so a crash
leaves the previous version, never half a file. Every reader turns damage into a `RunError`
for that run alone.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, RunConfig, check_run_name, run_label
from .device import resolve_device
from .errors import RunError
from .io import atomic_write_text, load_weights
from .models import build_model

DEFAULT_RUNS_DIR = Path(os.environ.get("DDPM_RUNS_DIR", "checkpoints"))
METRIC_FIELDS = ("step", "epoch", "loss", "lr", "elapsed_s", "images_per_s")
HEARTBEAT_STALE_S = 600.0  # a "running" run whose process went quiet this long is interrupted
STATES = ("created", "running", "finished", "stopped", "failed", "interrupted")
RESUMABLE_STATES = ("stopped", "interrupted", "failed")  # a finished run resumes too, given a longer limit


# -- paths -------------------------------------------------------------------------
def run_path(runs_dir: str | os.PathLike, name: str) -> Path:
    """The folder of run `name`, guaranteed to lie directly inside `runs_dir`."""
    check_run_name(name)
    root = Path(runs_dir).resolve()
    path = (root / name).resolve()
    if path.parent != root:  # defence in depth; check_run_name already forbids '/' and '..'
        raise ConfigError(f"name = {name!r} is not allowed: it leaves the runs folder {root}")
    return path


def _read_json(path: Path, run: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"run {run!r}: {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"run {run!r}: {path.name} is not valid JSON ({exc})") from None


# -- config ------------------------------------------------------------------------------------------
def create_run(runs_dir: str | os.PathLike, name: str, config: RunConfig) -> Path:
    """Make a new run folder with its config; refuses to overwrite an existing run."""
    path = run_path(runs_dir, name)
    if path.exists():
        raise ConfigError(f"name = {name!r} is not allowed: a run of that name exists in {path.parent}; "
                          "pick another name, or resume it with --resume")
    path.mkdir(parents=True)
    (path / "samples").mkdir()
    atomic_write_text(path / "config.json", config.to_json())
    write_status(path, "created")
    return path


def load_config(path: Path) -> RunConfig:
    if not path.is_dir():
        raise RunError(f"run {path.name!r}: no such run folder {path}")
    text_path = path / "config.json"
    if not text_path.is_file():
        raise RunError(f"run {path.name!r}: config.json is missing (the folder may be empty or "
                       "not a run); delete the folder or restore its config.json")
    try:
        return RunConfig.from_json(text_path.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise RunError(f"run {path.name!r}: {exc}") from None
    except UnicodeDecodeError:
        raise RunError(f"run {path.name!r}: config.json is not text") from None


# -- status ------------------------------------------------------------------------------------------
def write_status(path: Path, state: str, **extra: Any) -> None:
    status = {"state": state, "pid": os.getpid(), "updated_at": time.time(), **extra}
    atomic_write_text(path / "status.json", json.dumps(status))


def read_status(path: Path) -> dict[str, Any]:
    """The run's status, with a "running" run whose process is gone reported as interrupted."""
    try:
        status = json.loads((path / "status.json").read_text(encoding="utf-8"))
        if not isinstance(status, dict):
            raise ValueError
    except (OSError, ValueError):
        return {"state": "interrupted" if (path / "model.safetensors").exists() else "created"}
    if status.get("state") == "running" and not _process_alive(status):
        status["state"] = "interrupted"
    return status


def _number(value: Any, default: float = 0.0) -> float:
    """A number read from a run's JSON files; anything else (damage, hand edits) is the default."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if number == number else default  # NaN is damage too


def _process_alive(status: dict[str, Any]) -> bool:
    pid = status.get("pid")
    if not isinstance(pid, int):
        return False
    if time.time() - _number(status.get("updated_at")) > HEARTBEAT_STALE_S:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- metrics -----------------------------------------------------------------------------------------
class MetricsWriter:
    """Appends rows to metrics.csv, flushing each, so a killed run keeps every logged row."""

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists() or path.stat().st_size == 0
        self._fh = open(path, "a", newline="", encoding="utf-8")
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


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of metrics.csv as dicts of floats; a torn last line (killed mid-write) is skipped."""
    file = path / "metrics.csv" if path.is_dir() else path
    if not file.exists():
        return []
    rows = []
    # errors="replace": a garbled file yields unparsable rows (skipped), not an exception that
    # would take the whole run list down with it.
    with open(file, newline="", encoding="utf-8", errors="replace") as fh:
        try:
            for row in csv.DictReader(fh):
                try:
                    rows.append({k: float(row[k]) for k in METRIC_FIELDS})
                except (TypeError, ValueError, KeyError):
                    continue
        except csv.Error:
            pass  # keep the rows read before the damage
    return rows


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop rows logged after the checkpoint a resumed run restarts from (they will be redone)."""
    file = path / "metrics.csv"
    rows = [r for r in read_metrics(file) if r["step"] <= max_step]
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

    @property
    def label(self) -> str:
        if self.config is None:
            return f"{self.name} (unreadable)"
        return f"{self.name} · {run_label(self.config)}"


def read_eval(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((path / "eval.json").read_text(encoding="utf-8"))
        return data if isinstance(data, list) else []
    except (OSError, ValueError):
        return []


def run_info(path: Path) -> RunInfo:
    """Everything the run list shows; never raises for a damaged run."""
    name = path.name
    try:
        config = load_config(path)
    except RunError as exc:
        return RunInfo(name, path, None, "damaged", error=str(exc), readable=False)
    status = read_status(path)
    state_file = {}
    if (path / "state.json").exists():
        try:
            state_file = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state_file = {}
    if not isinstance(state_file, dict):  # damaged by hand or disk: show what the metrics say
        state_file = {}
    metrics = read_metrics(path)
    state = status.get("state", "created")
    meta = state_file.get("meta")
    error = status.get("error")
    info = RunInfo(
        name=name, path=path, config=config, state=state if state in STATES else "damaged",
        step=int(_number(state_file.get("step"), metrics[-1]["step"] if metrics else 0)),
        epoch=int(_number(state_file.get("epoch"))),
        last_loss=metrics[-1]["loss"] if metrics else None,
        error=None if error is None else str(error), updated_at=_number(status.get("updated_at")),
        evals=read_eval(path), meta=meta if isinstance(meta, dict) else {},
    )
    if info.state == "damaged" and info.error is None:
        info.error = f"run {name!r}: status.json holds an unknown state {state!r}"
    if info.state in ("finished", "stopped", "interrupted") and not (path / "model.safetensors").exists():
        info.state, info.readable = "damaged", False
        info.error = f"run {name!r}: model.safetensors is missing"
    return info


def list_runs(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> list[RunInfo]:
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    infos = [run_info(p) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return sorted(infos, key=lambda i: (-i.updated_at, i.name))


def delete_run(runs_dir: str | os.PathLike, name: str) -> None:
    path = run_path(runs_dir, name)
    if not path.is_dir():
        raise RunError(f"run {name!r}: no such run folder {path}")
    status = read_status(path)
    if status.get("state") == "running":
        raise RunError(f"run {name!r} is still training; stop it before deleting it")
    shutil.rmtree(path)


def append_eval(path: Path, entry: dict[str, Any]) -> None:
    """Add an evaluation entry, replacing an earlier one of the same sampler setting, sample count and
    classifier (a figure at another N or from another classifier is another measurement, kept)."""
    key = ("setting", "n", "classifier_sha256")
    entries = [e for e in read_eval(path) if not isinstance(e, dict) or any(e.get(k) != entry.get(k) for k in key)]
    entries.append(entry)
    atomic_write_text(path / "eval.json", json.dumps(entries, indent=2))


# -- rebuilding a trained model ----------------------------------------------------------------------
@dataclass
class LoadedRun:
    name: str
    path: Path
    config: RunConfig
    model: nn.Module
    used_ema: bool


def load_model(path: Path, use_ema: bool = True, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild a run's network from config.json and its (EMA, when present) weights, in eval mode."""
    path = Path(path)
    device = resolve_device(device)  # a missing GPU is a ConfigError naming the device
    config = load_config(path)
    model = build_model(config.model)
    ema_file = path / "ema.safetensors"
    chosen = ema_file if use_ema and ema_file.exists() else path / "model.safetensors"
    load_weights(chosen, model, path.name)
    model.to(device).eval()
    return LoadedRun(path.name, path, config, model, chosen == ema_file)
