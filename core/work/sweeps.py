"""Sweeps and ablations: a base preset plus factors, every run on the same budget, one results table.

A sweep is either a full **grid** over its factors (`optimizer=adam,adamw` × `model=unet,improved_unet`)
or a **path** that changes one thing at a time from the base towards a target, each step keeping the
ones before (book → +ImprovedUNet → +AdamW → … = improved: the blog's changes taken apart).
Every run gets the same budget: seconds of training (wall clock, evaluation not counted), optimizer
steps, or images seen. An images budget is the fair one on a busy machine: it does not depend on
what else shares the cores.

The sweep lives in `<runs>/sweeps/<name>/`: `sweep.json` (its definition and the run names) and,
after each run, `results.csv` / `results.json` (one row per run: its factors, the steps it reached,
its final loss and the evaluation figures). Its runs are ordinary run folders in the runs folder,
named `<sweep>-NN-<step>`, so every page (Compare, Reverse, Evaluate) opens them.
"""
from __future__ import annotations

import csv
import io as text_io
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from ..models import budget as memory
from . import queue
from ..store import runs
from ..config import (DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS, MAX_SAMPLES, ConfigError, ModelConfig, RunConfig,
                     SampleConfig, ScheduleConfig, TrainConfig, check_run_name, override, preset)
from ..device import resolve_device
from ..errors import RunError
from ..store.io import MAX_JSON_BYTES, atomic_write_text, open_folder, read_json_file

SWEEP_FORMAT = 1
MAX_RUNS = 64            # a bigger grid is almost surely a typo, and days of CPU time
MODES = ("grid", "path")
BUDGET_KINDS = ("seconds", "steps", "images")
FINAL_LOSS_ROWS = 10     # the final loss is the mean of the last logged rows: one row is one noisy batch
# The budget is the sweep's: a factor may not change how long a run trains.
BUDGET_FIELDS = ("epochs", "max_steps", "time_budget_s")
# Fields that are not recipe: changing them answers no question about the model.
NOT_FACTORS = ("device", "log_every", "checkpoint_every_s", "sample_every_epochs", "grid_sampler", "grid_steps",
               "in_channels", "out_channels")
RESULT_FIELDS = ("run", "label", "changes", "state", "steps", "images", "train_s", "final_loss", "setting",
                 "n", "fd", "fd_ratio", "floor", "class_entropy", "error")


class SweepError(ConfigError):
    """A sweep definition is not allowed; the message says what and what to do."""


# -- budget ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How long every run of a sweep trains: `amount` seconds, steps or images."""
    kind: str
    amount: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise SweepError(f"budget = {self.kind!r} is not allowed: choose one of {', '.join(BUDGET_KINDS)}")
        if isinstance(self.amount, bool) or not isinstance(self.amount, (int, float)) \
                or not math.isfinite(self.amount) or self.amount <= 0:
            raise SweepError(f"budget = {self.amount!r} {self.kind} is not allowed: give a number above 0 "
                             "(a run with no budget would not train)")
        if self.kind != "seconds" and self.amount != int(self.amount):
            raise SweepError(f"budget = {self.amount!r} {self.kind} is not allowed: give a whole number")

    def apply(self, config: RunConfig) -> RunConfig:
        """The run's config with this budget as its only limit."""
        if self.kind == "seconds":
            return override(config, epochs=0, max_steps=0, time_budget_s=float(self.amount))
        steps = int(self.amount) if self.kind == "steps" else math.ceil(self.amount / config.train.batch_size)
        return override(config, epochs=0, max_steps=steps, time_budget_s=0.0)

    def describe(self) -> str:
        return {"seconds": f"{self.amount:g} s of training each", "steps": f"{int(self.amount):,} steps each",
                "images": f"{int(self.amount):,} training images each"}[self.kind]


# -- factors -----------------------------------------------------------------------------------------
_SECTIONS = (ModelConfig, ScheduleConfig, TrainConfig)
_ALIASES = {"model": "name"}


def factor_names() -> list[str]:
    """Every config field a sweep may vary ("model" is the network's name)."""
    names = {"model"} | {f.name for kind in _SECTIONS for f in fields(kind)} - {"name"}
    return sorted(names - set(BUDGET_FIELDS) - set(NOT_FACTORS))


def _field_default(name: str) -> Any:
    key = _ALIASES.get(name, name)
    for kind in _SECTIONS:
        for f in fields(kind):
            if f.name == key:
                return getattr(kind(), key)
    raise KeyError(name)


def parse_value(name: str, text: str) -> Any:
    """A factor value from its text, typed like the field: on/off for flags, 1/2/2 for tuples."""
    default = _field_default(name)
    text = text.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in ("on", "true", "yes", "1"):
                return True
            if text.lower() in ("off", "false", "no", "0"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        if isinstance(default, tuple):
            kind = type(default[0]) if default else int
            return tuple(kind(part) for part in text.split("/"))
    except ValueError:
        raise SweepError(f"{name} = {text!r} is not allowed: it must be "
                         + ("on or off" if isinstance(default, bool) else
                            "numbers separated by '/', like 1/2/2" if isinstance(default, tuple) else
                            "a whole number" if isinstance(default, int) else "a number")) from None
    return text


def parse_factor(spec: str) -> tuple[str, tuple[Any, ...]]:
    """`optimizer=adam,adamw` -> ("optimizer", ("adam", "adamw")); every value is checked later, in a config."""
    if "=" not in spec:
        raise SweepError(f"--vary {spec!r} is not allowed: write name=value1,value2 (e.g. optimizer=adam,adamw)")
    name, _, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if name in BUDGET_FIELDS:
        raise SweepError(f"--vary {name} is not allowed: the sweep's budget (--budget-s, --budget-steps, "
                         "--budget-images) sets how long every run trains")
    if name not in factor_names():
        raise SweepError(f"--vary {name!r} is not allowed: unknown factor; choose from {', '.join(factor_names())}")
    parts = [v for v in values.split(",") if v.strip()]
    if not parts:
        raise SweepError(f"--vary {name}= has no values: give at least one, e.g. {name}=a,b")
    parsed = tuple(parse_value(name, v) for v in parts)
    if len(set(parsed)) != len(parsed):
        raise SweepError(f"--vary {spec!r} is not allowed: a value is given twice")
    return name, parsed


@dataclass(frozen=True)
class PathStep:
    """One step of an ablation path: a label and the fields it changes (on top of the steps before)."""
    label: str
    slug: str
    changes: dict[str, Any] = field(default_factory=dict)


_IMPROVED = preset("improved")


def blog_path(book_width: int, improved_width: int) -> tuple[PathStep, ...]:
    """The blog's changes taken apart, from the book's step 9 to the `improved` preset, one at a time,
    with the two networks at the given widths. AdamW's step brings the weight decay that makes it
    differ from Adam; the improved preset's learning rate is a step of its own, so a gain is not
    credited to the wrong change."""
    book_step = {} if book_width == preset("book").model.base_channels else {"base_channels": book_width}
    return (
        PathStep(f"book (UNet {book_width} wide, Adam, [0, 1])", "book", book_step),
        PathStep(f"+ ImprovedUNet ({improved_width} wide)", "improved-unet", {
            "model": "improved_unet", "base_channels": improved_width,
            "channel_mults": _IMPROVED.model.channel_mults, "num_res_blocks": _IMPROVED.model.num_res_blocks,
            "attention": _IMPROVED.model.attention, "norm": _IMPROVED.model.norm}),
        PathStep("+ AdamW (weight decay 0.01)", "adamw",
                 {"optimizer": "adamw", "weight_decay": _IMPROVED.train.weight_decay}),
        PathStep("+ lr 2e-3", "lr", {"lr": _IMPROVED.train.lr}),
        PathStep("+ [-1, 1] pixels", "symmetric", {"pixel_range": "symmetric"}),
        PathStep("+ EMA 0.999", "ema", {"ema_decay": _IMPROVED.train.ema_decay}),
        PathStep("+ grad clip, warm-up, clipped x̂0 (= improved)", "clip-warmup",
                 {"grad_clip": _IMPROVED.train.grad_clip, "warmup_steps": _IMPROVED.train.warmup_steps,
                  "clip_denoised": _IMPROVED.train.clip_denoised}),
    )


# name -> (base preset, steps). `blog`: the presets' widths (book 64, improved 32); `blog-demo`: the
# widths of the shipped demo pair (book 16, improved 12; docs/results.md), cheap enough for a CPU.
ABLATION_PATHS: dict[str, tuple[str, tuple[PathStep, ...]]] = {
    "blog": ("book", blog_path(preset("book").model.base_channels, _IMPROVED.model.base_channels)),
    "blog-demo": ("book", blog_path(16, 12)),
}


# -- the definition ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepRun:
    name: str
    label: str
    changes: dict[str, Any]   # what differs from the base config (factor name -> value)
    config: RunConfig


@dataclass(frozen=True)
class Sweep:
    name: str
    mode: str
    base: str                 # the preset the runs start from
    budget: Budget
    evaluation: SampleConfig | None
    runs: tuple[SweepRun, ...]
    factors: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    path: str | None = None
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": SWEEP_FORMAT, "name": self.name, "mode": self.mode, "base": self.base,
                "path": self.path, "factors": [[n, list(_jsonable(v) for v in vs)] for n, vs in self.factors],
                "budget": {"kind": self.budget.kind, "amount": self.budget.amount},
                "eval": None if self.evaluation is None else {
                    "sampler": self.evaluation.sampler, "steps": self.evaluation.steps, "n": self.evaluation.n,
                    "seed": self.evaluation.seed},
                "created_at": self.created_at,
                "runs": [{"name": r.name, "label": r.label, "changes": {k: _jsonable(v) for k, v in r.changes.items()}}
                         for r in self.runs]}


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "run"


MAX_SWEEP_NAME = 77  # a run name (at most 80 characters) is the sweep's name, "-NN" and a slug


def _run_name(sweep: str, index: int, slug: str) -> str:
    """`<sweep>-<NN>-<slug>`, the slug cut to fit 80 characters: the index always survives the cut,
    so two runs of one sweep never share a name."""
    head = f"{sweep}-{index:02d}"
    return f"{head}-{slug}"[:80].rstrip("-.") if len(head) < 79 else head


def _changes_label(changes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in changes.items()) \
        or "base"


def plan(name: str, base: str, budget: Budget, *, mode: str = "grid",
         factors: list[tuple[str, tuple[Any, ...]]] | None = None, path: str | None = None,
         evaluation: SampleConfig | None = None, seed: int | None = None) -> Sweep:
    """Every run of a sweep with its checked config; raises SweepError / ConfigError before anything exists.

    grid: one run per combination of the factors' values. path: the base, then one run per factor (or
    per step of a named path), each adding its change to the ones before; a factor gives its target value.
    """
    check_run_name(name)
    if len(name) > MAX_SWEEP_NAME:
        raise SweepError(f"name = {name[:20]}… ({len(name)} characters) is not allowed: a sweep's runs are named "
                         f"<name>-NN-…, so a sweep name holds at most {MAX_SWEEP_NAME} characters")
    if mode not in MODES:
        raise SweepError(f"mode = {mode!r} is not allowed: choose grid or path")
    factors = list(factors or [])
    names = [n for n, _ in factors]
    if len(set(names)) != len(names):
        raise SweepError(f"--vary {next(n for n in names if names.count(n) > 1)} is given twice: list all its "
                         "values in one --vary")
    if path is not None:
        if path not in ABLATION_PATHS:
            raise SweepError(f"path = {path!r} is not allowed: choose one of {', '.join(ABLATION_PATHS)}")
        if factors:
            raise SweepError("--path and --vary do not mix: a named path fixes its own steps")
        mode = "path"
        path_base, steps = ABLATION_PATHS[path]
        base = path_base if base is None else base
    elif mode == "path":
        for n, values in factors:
            if len(values) != 1:
                raise SweepError(f"--vary {n}={','.join(map(str, values))} is not allowed in path mode: give the "
                                 "one value the path moves to (each --vary is one step)")
        steps = (PathStep("base", "base"), *(PathStep(f"+ {n}={_changes_label({n: v[0]}).split('=', 1)[1]}",
                                                      _slug(f"{n}-{v[0]}"), {n: v[0]}) for n, v in factors))
    if base is None:
        raise SweepError("a sweep needs a base: give --preset (e.g. book, improved, tiny)")
    base_config = preset(base)
    if seed is not None:
        base_config = override(base_config, seed=seed)
    if path is None and not factors:
        raise SweepError("the grid is empty: give at least one --vary name=value1,value2 (or --path blog)")

    planned: list[tuple[str, str, dict[str, Any]]] = []  # (slug, label, changes)
    if mode == "grid":
        combos = list(itertools.product(*(values for _, values in factors)))
        if len(combos) > MAX_RUNS:
            raise SweepError(f"the grid has {len(combos)} runs, more than {MAX_RUNS}: vary fewer factors or values")
        for combo in combos:
            changes = dict(zip(names, combo))
            planned.append((_slug("-".join(f"{k}-{v}" for k, v in changes.items())), _changes_label(changes), changes))
    else:
        if len(steps) > MAX_RUNS:
            raise SweepError(f"the path has {len(steps)} runs, more than {MAX_RUNS}")
        changes: dict[str, Any] = {}
        for step in steps:
            changes = {**changes, **step.changes}
            planned.append((step.slug, step.label, dict(changes)))

    sweep_runs = []
    for index, (slug, label, changes) in enumerate(planned):
        try:
            config = budget.apply(override(base_config, **changes))
        except ConfigError as exc:
            raise SweepError(f"run {index + 1} ({label}): {exc}") from None
        sweep_runs.append(SweepRun(_run_name(name, index, slug), label, changes, config))
    if evaluation is not None:
        for run in sweep_runs:
            evaluation.resolved_steps(run.config.schedule.timesteps)
    return Sweep(name, mode, base, budget, evaluation, tuple(sweep_runs), tuple(factors), path,
                 time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def default_evaluation(n: int, sampler: str = DEFAULT_FEW_STEP_SAMPLER, steps: int = DEFAULT_FEW_STEPS,
                       seed: int = 0) -> SampleConfig | None:
    """The sweep's evaluation setting (N = 0: no evaluation)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > MAX_SAMPLES:
        raise SweepError(f"eval_n = {n!r} is not allowed: give 0 (no evaluation) to {MAX_SAMPLES}")
    if n == 0:
        return None
    if n < 2:
        raise SweepError(f"eval_n = {n} is not allowed: a Fréchet distance needs at least 2 samples")
    return SampleConfig(sampler=sampler, steps=0 if sampler == "ddpm" else steps, n=n, seed=seed)


# -- the folder --------------------------------------------------------------------------------------
def sweeps_root(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / runs.SWEEPS_FOLDER


def sweep_path(runs_dir: str | Path, name: str) -> Path:
    check_run_name(name)
    return sweeps_root(runs_dir) / name


def _make_folder(runs_dir: str | Path, folder: Path) -> None:
    """mkdir sweeps/ (once) and sweeps/<name>, each relative to its checked parent: a `sweeps`
    planted as a link out of the runs folder is refused, never written through."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    for sub in (folder.parent, folder):
        parent = open_folder(sub.parent, inside=runs_dir)
        try:
            os.mkdir(sub.name, 0o755, dir_fd=parent)
        except FileExistsError:
            pass  # checked as a real folder by the next open_folder
        finally:
            os.close(parent)
    os.close(open_folder(folder, inside=runs_dir))


def create(runs_dir: str | Path, sweep: Sweep) -> Path:
    """The sweep folder and its run folders; refuses names in use before writing anything."""
    folder = sweep_path(runs_dir, sweep.name)
    if folder.exists() or folder.is_symlink():
        raise SweepError(f"name = {sweep.name!r} is not allowed: a sweep of that name exists in {folder.parent}; "
                         "pick another --name, or continue it with --resume")
    taken = [r.name for r in sweep.runs if runs.run_path(runs_dir, r.name).exists()]
    if taken:
        raise SweepError(f"name = {sweep.name!r} is not allowed: the run {taken[0]!r} exists already; pick another "
                         "sweep name")
    for run in sweep.runs:  # a grid may hold one network too big for this machine: say so before anything exists
        memory.check_training_fits(run.config, resolve_device(run.config.train.device))
    _make_folder(runs_dir, folder)
    atomic_write_text(folder / "sweep.json", json.dumps(sweep.to_dict(), indent=2), inside=runs_dir)
    for run in sweep.runs:
        runs.create_run(runs_dir, run.name, run.config)
    return folder


def enqueue(runs_dir: str | Path, sweep: Sweep) -> Path:
    """Create the sweep and put its runs in the run queue (they train one after another, in the
    dashboard's queue worker or `python -m core queue run`). The queue scores every run it finishes
    at one setting; a sweep's runs at the sweep's when the queue has none (only they, not later runs),
    and a queue set to another setting is refused (the table would miss its scores), before anything
    is created."""
    current = queue.read_queue(runs_dir)  # QueueDamaged before anything exists
    wanted = None if sweep.evaluation is None else queue.check_eval_setting(
        sweep.evaluation.sampler, sweep.evaluation.steps, sweep.evaluation.n)
    if wanted is not None and current.eval is not None and current.eval != wanted:
        raise SweepError(f"the run queue scores at {current.eval.label}, this sweep at {wanted.label}: give the "
                         "sweep the queue's setting, or change the queue's (queue eval), then try again")
    folder = create(runs_dir, sweep)
    # The sweep's own setting scores its runs (`queue_evaluation`); the queue's, which applies to every
    # later run, stays as the user set it.
    queue.add(runs_dir, [r.name for r in sweep.runs])
    return folder


def queue_evaluation(runs_dir: str | Path, run: str) -> "queue.EvalSetting | None":
    """The evaluation setting of the sweep that holds `run` (None when no readable sweep does): the
    queue scores a sweep's runs at it when the queue itself has none."""
    for name in list_sweeps(runs_dir):
        try:
            definition = load(runs_dir, name)
        except RunError:
            continue
        if any(entry["name"] == run for entry in definition["runs"]):
            evaluation = evaluation_of(definition)
            return None if evaluation is None else queue.check_eval_setting(
                evaluation.sampler, evaluation.steps, evaluation.n)
    return None


def load(runs_dir: str | Path, name: str) -> dict[str, Any]:
    """sweep.json, checked (bounded read, a regular file inside the sweeps folder, every field typed)."""
    folder = sweep_path(runs_dir, name)
    if folder.is_symlink() or not folder.is_dir():
        raise RunError(f"sweep {name!r}: no such sweep folder {folder}")
    data = read_json_file(folder / "sweep.json", MAX_JSON_BYTES, f"sweeps/{name}")
    problem = _check_definition(data)
    if problem:
        raise RunError(f"sweep {name!r}: sweep.json {problem}; restore it or delete the sweep folder")
    return data


def _check_definition(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "is not a JSON object"
    if data.get("format_version") != SWEEP_FORMAT:
        return f"has format_version {data.get('format_version')!r}, this version reads {SWEEP_FORMAT}"
    if data.get("mode") not in MODES:
        return f"has an unknown mode {str(data.get('mode'))[:40]!r}"
    run_list = data.get("runs")
    if not isinstance(run_list, list) or not 0 < len(run_list) <= MAX_RUNS:
        return f"must list 1 to {MAX_RUNS} runs"
    for entry in run_list:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("label"), str) or not isinstance(entry.get("changes"), dict):
            return "has a run entry without name, label and changes"
        try:
            check_run_name(entry["name"])
        except ConfigError:
            return f"names a run {entry['name'][:80]!r} that is not a run name"
    budget = data.get("budget")
    if not isinstance(budget, dict):
        return "has no budget"
    try:
        Budget(budget.get("kind"), budget.get("amount"))
    except SweepError as exc:
        return f"has a bad budget ({exc})"
    evaluation = data.get("eval")
    if evaluation is not None:
        if not isinstance(evaluation, dict):
            return "has an eval entry that is not an object"
        try:
            SampleConfig(sampler=evaluation.get("sampler"), steps=evaluation.get("steps"), n=evaluation.get("n"),
                         seed=evaluation.get("seed", 0))
        except ConfigError as exc:
            return f"has a bad eval setting ({exc})"
    return None


def list_sweeps(runs_dir: str | Path) -> list[str]:
    """Names of the sweep folders (real folders, not links), newest definition first."""
    root = sweeps_root(runs_dir)
    if root.is_symlink() or not root.is_dir():
        return []
    found = [p for p in root.iterdir() if not p.name.startswith(".") and not p.is_symlink() and p.is_dir()]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def evaluation_of(definition: dict[str, Any]) -> SampleConfig | None:
    e = definition.get("eval")
    return None if e is None else SampleConfig(sampler=e["sampler"], steps=e["steps"], n=e["n"], seed=e.get("seed", 0))


# -- results -----------------------------------------------------------------------------------------
def _final_loss(rows: list[dict[str, float]]) -> float | None:
    """The mean loss of the last logged metrics rows (one row is one noisy batch)."""
    if not rows:
        return None
    tail = [r["loss"] for r in rows[-FINAL_LOSS_ROWS:]]
    return round(sum(tail) / len(tail), 5)


def _eval_entry(info: runs.RunInfo, evaluation: SampleConfig | None) -> dict[str, Any] | None:
    """The run's newest eval.json entry at the sweep's setting and N (any classifier: the newest)."""
    if evaluation is None or info.config is None:
        return None
    steps = evaluation.resolved_steps(info.config.schedule.timesteps)
    from_setting = SampleConfig(sampler=evaluation.sampler, steps=steps, n=evaluation.n).setting
    matching = [e for e in info.evals if e.get("setting") == from_setting and e.get("n") == evaluation.n]
    return matching[-1] if matching else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def results(runs_dir: str | Path, definition: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run of the sweep, read from its run folder (a damaged run is a row that says so)."""
    evaluation = evaluation_of(definition)
    rows = []
    for entry in definition["runs"]:
        try:
            run_dir: Path | None = runs.run_path(runs_dir, entry["name"])
            link_error = None
        except ConfigError as exc:  # the run's name is a link planted in its place: not the run, never read
            run_dir, link_error = None, str(exc)
        row: dict[str, Any] = {"run": entry["name"], "label": entry["label"], "changes": _changes_label(
            {k: tuple(v) if isinstance(v, list) else v for k, v in entry["changes"].items()}),
            "state": "missing", "steps": 0, "images": 0, "train_s": None, "final_loss": None,
            "setting": None, "n": None, "fd": None, "fd_ratio": None, "floor": None, "class_entropy": None,
            "error": link_error, "noise": None}  # noise: the pure-noise reference (not a CSV column: format 1 stays)
        if run_dir is not None and runs.is_run_folder(run_dir, Path(runs_dir)):
            info = runs.run_info(run_dir)
            row["state"], row["error"] = info.state, info.error
            if info.readable and info.config is not None:
                row["steps"] = info.step
                row["images"] = info.step * info.config.train.batch_size
                metrics = runs.read_metrics(run_dir, run_dir.name)  # read once for both figures
                row["train_s"] = round(metrics[-1]["elapsed_s"], 1) if metrics else None
                row["final_loss"] = _final_loss(metrics)
                found = _eval_entry(info, evaluation)
                if found is not None:
                    row.update(setting=found.get("setting"), n=found.get("n"), fd=_number(found.get("fd")),
                               fd_ratio=_number(found.get("fd_ratio")), floor=_number(found.get("fd_floor")),
                               noise=_number(found.get("fd_noise")),
                               class_entropy=_number(found.get("class_entropy")))
        rows.append(row)
    return rows


def write_results(runs_dir: str | Path, name: str) -> list[dict[str, Any]]:
    """results.csv and results.json of the sweep, rewritten from its run folders; returns the rows."""
    definition = load(runs_dir, name)
    rows = results(runs_dir, definition)
    folder = sweep_path(runs_dir, name)
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in RESULT_FIELDS})
    atomic_write_text(folder / "results.csv", buffer.getvalue(), inside=runs_dir)
    atomic_write_text(folder / "results.json", json.dumps({"sweep": name, "budget": definition["budget"],
                                                           "eval": definition["eval"], "rows": rows}, indent=2),
                      inside=runs_dir)
    return rows


# -- running -----------------------------------------------------------------------------------------
TrainFn = Callable[[Path], None]
EvalFn = Callable[[Path, SampleConfig], None]
Say = Callable[[str], None]


def run(runs_dir: str | Path, name: str, train: TrainFn, evaluate: EvalFn, say: Say = lambda _: None) -> list[dict]:
    """Train (or resume) every run of the sweep in order, evaluate each once trained, and rewrite the
    results table after each. A run that fails is recorded as failed and the sweep goes on; a run
    already finished on its budget (and evaluated) is skipped, so running a sweep again continues it.
    `train` and `evaluate` are the caller's (the CLI's foreground loop), so this module needs no job
    machinery."""
    definition = load(runs_dir, name)
    evaluation = evaluation_of(definition)
    total = len(definition["runs"])
    for index, entry in enumerate(definition["runs"], 1):
        try:
            run_dir = runs.run_path(runs_dir, entry["name"])
        except ConfigError as exc:  # a link planted in the run's place is never trained through
            say(f"[{index}/{total}] {entry['name']}: skipped ({exc})")
            continue
        info = runs.run_info(run_dir) if run_dir.is_dir() else None
        if info is None or not info.readable:
            say(f"[{index}/{total}] {entry['name']}: skipped ({info.error if info else 'the run folder is missing'})")
            continue
        if info.state != "finished":
            say(f"[{index}/{total}] {entry['label']}: training {entry['name']}")
            try:
                train(run_dir)
            except (ConfigError, RunError, RuntimeError, OSError) as exc:
                say(f"[{index}/{total}] {entry['name']}: failed ({exc}); the sweep goes on")
                write_results(runs_dir, name)
                continue
            info = runs.run_info(run_dir)
            if info.state != "finished":  # stopped by the user: the sweep stops with it
                write_results(runs_dir, name)
                say(f"[{index}/{total}] {entry['name']}: {info.state}; continue the sweep with --resume {name}")
                return results(runs_dir, definition)
        if evaluation is not None and _eval_entry(info, evaluation) is None:
            say(f"[{index}/{total}] {entry['name']}: evaluating ({evaluation.sampler}, N = {evaluation.n})")
            try:
                evaluate(run_dir, evaluation)
            except (ConfigError, RunError, RuntimeError, OSError) as exc:
                say(f"[{index}/{total}] {entry['name']}: evaluation failed ({exc})")
        write_results(runs_dir, name)
    return write_results(runs_dir, name)
