"""Generated fuzz test of every file type the workbench reads (issue 23).

For each JSON and safetensors file type (config, state, status, checkpoint manifest, weights, eval,
queue, sweep, results, the classifier and its test-statistics cache), each hostile mutation (huge
integers, NaN, inf, wrong types, deep nesting, truncation, a link, a FIFO, a folder in its place)
is applied alone to a fresh copy of one shared runs folder, and every CLI command that reads that
file runs in-process (`core.cli.main.main`): it must end with status 0, or 1/2 and one `error:` line,
never a traceback, and the healthy run must still list. The dashboard pages then render a runs
folder holding one damaged run per mutation (and each damaged queue / sweep file) without an
exception. The classifier files are read through `load_classifier` and `QualityEvaluator` (what
`eval` calls first): a damaged classifier must end as a ClassifierError, never be used, and a damaged
cache must be recomputed, since `eval` would refit the classifier (minutes) on a damaged one.
"""
from __future__ import annotations

import contextlib
import io as text_io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, make_tiny_images, stop_queue_worker, tiny_config
from core.cli.main import main
from core.evaluation.classifier import ClassifierError, FitConfig, fit, load_classifier, save_classifier
from core.evaluation.frechet import QualityEvaluator
from core.store import runs
from core.train.training import train_run
from core.work import queue, sweeps

APP = str(REPO / "dashboard" / "app.py")
HUGE = "9" * 400
NESTED = "[" * 100_000 + "]" * 100_000


# -- the mutations -------------------------------------------------------------------------------------
def _numbers(text: str, replacement: str) -> str:
    """Every JSON number (a value after ':' or in a list) replaced."""
    return re.sub(r'(?<=[:\[,\s])-?\d+(\.\d+)?([eE][-+]?\d+)?(?=\s*[,}\]])', replacement, text)


def _swap_types(value):
    if isinstance(value, dict):
        return {k: _swap_types(v) for k, v in value.items()}
    if isinstance(value, list):
        return {"list": len(value)}
    if isinstance(value, bool) or value is None:
        return "yes"
    if isinstance(value, (int, float)):
        return str(value)
    return [value]


def _json_text(data: bytes, change: Callable[[str], str]) -> bytes:
    return change(data.decode("utf-8")).encode("utf-8")


def _safetensors(data: bytes, change: Callable[[str], str]) -> bytes:
    """The same change applied to a safetensors file's JSON header (length prefix rewritten)."""
    size = int.from_bytes(data[:8], "little")
    header = change(data[8:8 + size].decode("utf-8")).encode("utf-8")
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


def _nan_data(data: bytes) -> bytes:
    size = int.from_bytes(data[:8], "little")
    return data[:8 + size] + b"\xff" * (len(data) - 8 - size)  # float32/64 NaN in every tensor


TEXT_CHANGES = {
    "huge-int": lambda text: _numbers(text, HUGE),
    "nan": lambda text: _numbers(text, "NaN"),
    "inf": lambda text: _numbers(text, "1e999"),
    "wrong-types": lambda text: json.dumps(_swap_types(json.loads(text))),
    "nested": lambda text: NESTED,
}


def mutate(path: Path, kind: str, outside: Path) -> None:
    """Apply mutation `kind` to the file at `path` (its original content kept outside for a link)."""
    data = path.read_bytes() if path.is_file() else b"{}"
    is_tensor = path.suffix == ".safetensors"
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if kind in TEXT_CHANGES:
        change = TEXT_CHANGES[kind]
        path.write_bytes(_safetensors(data, change) if is_tensor else _json_text(data, change))
    elif kind == "nan-data":
        path.write_bytes(_nan_data(data))
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "link":  # to an intact copy outside the runs folder: never followed
        target = outside / f"copy-{path.name}"
        target.write_bytes(data)
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        raise AssertionError(kind)


MUTATIONS = ("huge-int", "nan", "inf", "wrong-types", "nested", "truncated", "link", "fifo", "folder")
TENSOR_MUTATIONS = ("huge-int", "wrong-types", "nested", "nan-data", "truncated", "link", "fifo", "folder")
RUN_FILES = {"config": "config.json", "state": "state.json", "status": "status.json",
             "manifest": "checkpoint.json", "eval": "eval.json", "weights": "ema.safetensors"}
ROOT_FILES = {"queue": "queue.json", "sweep": "sweeps/s/sweep.json", "results-json": "sweeps/s/results.json",
              "results-csv": "sweeps/s/results.csv"}


# -- the shared runs folder ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """<tmp>/runs with a trained 'healthy' run (EMA, previous/), the victim copy, a sweep, a queue
    entry and an eval.json; <tmp>/classifiers with a tiny classifier and its statistics cache."""
    top = tmp_path_factory.mktemp("fuzz")
    root = top / "runs"
    healthy = runs.create_run(root, "healthy", tiny_config(ema_decay=0.9, checkpoint_every_s=1e-9))
    train_run(healthy, images=make_tiny_images())
    runs.append_eval(healthy, {"setting": "ddim-2", "n": 8, "classifier_sha256": "ab" * 32, "fd": 70.42,
                               "fd_floor": 10.0, "fd_ratio": 7.04})
    shutil.copytree(healthy, root / "victim")
    sweeps.create(root, sweeps.plan("s", "tiny", sweeps.Budget("steps", 2), factors=[("optimizer", ("adam",))]))
    sweeps.write_results(root, "s")
    queue.add(root, ["victim"])
    images = make_tiny_images(128)
    classifier = save_classifier(fit(images, images, FitConfig(epochs=1, max_steps=2, batch_size=32)),
                                 top / "classifiers" / "fashion_mnist.safetensors")
    QualityEvaluator(classifier, make_tiny_images(64, seed=1))  # writes the cache
    return top


def fresh(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    top = tmp_path / "copy"
    shutil.copytree(base, top, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    return top, outside


def cli(*args: str) -> tuple[int, str]:
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:
            rc = exc.code
    return rc, err.getvalue()


def answers_cleanly(args: tuple[str, ...]) -> None:
    rc, err = cli(*args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and rc in (0, 1, 2), (args, rc, err[-1500:])
    if rc == 2:
        assert len(errors) == 1 and len(errors[0]) < 700, (args, err[-1500:])


def healthy_lists(root: Path) -> None:
    out = text_io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["runs", "--runs-dir", str(root), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(out.getvalue())}
    assert rows["healthy"]["state"] == "finished" and rows["healthy"]["step"] == 6, rows["healthy"]


def commands(kind: str, root: Path, top: Path) -> list[tuple[str, ...]]:
    r, docs, grid = ("--runs-dir", str(root)), str(top / "docs"), str(top / "grid.png")
    victim = str(root / "victim")
    if kind in RUN_FILES:
        return [("runs", *r),  # (`runs --json` follows every case: healthy_lists)
                ("sample", "--run", victim, "--sampler", "ddim", "--steps", "2", "--n", "1", "--quiet",
                 "--device", "cpu", "--out", grid),
                ("report", "--runs", victim, "--out", docs), ("queue", "add", *r, "healthy")]
    if kind == "queue":
        return [("queue", "list", *r), ("queue", "list", *r, "--json"), ("queue", "add", *r, "healthy"),
                ("queue", "eval", *r, "--off"), ("queue", "run", *r), ("queue", "resume", *r),
                ("sweep", *r, "--preset", "tiny", "--budget-steps", "2", "--vary", "optimizer=adam", "--queue",
                 "--name", "q")]
    # sweep.json, results.*: --resume of a damaged definition is refused before any training; the
    # results files are rewritten by `report --sweep` (and by every step of a sweep)
    resume = [("sweep", *r, "--resume", "s", "--quiet")] if kind == "sweep" else []
    return [*resume, ("report", "--sweep", "s", *r, "--out", docs)]


CASES = [(kind, m) for kind, name in {**RUN_FILES, **ROOT_FILES}.items()
         for m in (TENSOR_MUTATIONS if name.endswith(".safetensors") else MUTATIONS)
         if not (kind == "results-csv" and m in TEXT_CHANGES and m != "nested")]  # CSV: no JSON numbers


def test_every_cli_command_answers_every_mutation(base, tmp_path):
    """All cases in one test (one copy each): a failure names its (file type, mutation, command)."""
    failures = []
    for kind, mutation in CASES:
        case = tmp_path / f"{kind}-{mutation}"
        top, outside = fresh(base, case)
        root = top / "runs"
        target = root / ("victim/" + RUN_FILES[kind] if kind in RUN_FILES else ROOT_FILES[kind])
        mutate(target, mutation, outside)
        for args in commands(kind, root, top):
            try:
                answers_cleanly(args)
            except BaseException as exc:  # noqa: BLE001 - collected, so one run shows every failing case
                failures.append(f"{kind}/{mutation}: {' '.join(args[:3])}: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            healthy_lists(root)
        except BaseException as exc:  # noqa: BLE001
            failures.append(f"{kind}/{mutation}: healthy run not listed: {type(exc).__name__}: {str(exc)[:300]}")
        assert [p.name for p in outside.iterdir() if not p.name.startswith("copy-")] == []
        shutil.rmtree(case, ignore_errors=True)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("mutation", TENSOR_MUTATIONS)
def test_classifier_and_cache_mutations_are_refused_or_recomputed(base, tmp_path, mutation):
    top, outside = fresh(base, tmp_path)
    folder = top / "classifiers"
    test = make_tiny_images(64, seed=1)
    mutate(folder / "fashion_mnist.test-stats.safetensors", mutation, outside)
    classifier = load_classifier("fashion_mnist", folder)
    evaluator = QualityEvaluator(classifier, test)
    assert not evaluator.stats_from_cache and evaluator.cache_note
    assert QualityEvaluator(classifier, test).stats_from_cache or mutation in ("link", "folder", "fifo")
    mutate(folder / "fashion_mnist.safetensors", mutation, outside)
    with pytest.raises(ClassifierError) as raised:
        load_classifier("fashion_mnist", folder)
    assert len(str(raised.value)) < 700 and "\n" not in str(raised.value)


# -- the dashboard -----------------------------------------------------------------------------------------
PAGES = ("views/runs.py", "views/train.py", "views/compare.py", "views/reverse.py", "views/experiments.py",
         "views/forward.py")


@pytest.fixture
def dashboard_runs(monkeypatch):
    def point(root: Path) -> None:
        monkeypatch.setenv("DDPM_RUNS_DIR", str(root))
    yield point
    stop_queue_worker()


def pages_render(root: Path, pages=PAGES) -> None:
    at = AppTest.from_file(APP, default_timeout=120).run()
    for page in pages:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception][:1])
    if "views/runs.py" in pages:
        at.switch_page("views/runs.py").run()
        assert "healthy" in set(at.dataframe[0].value["run"])


def test_dashboard_pages_with_one_damaged_run_per_mutation(base, tmp_path, dashboard_runs):
    top, outside = fresh(base, tmp_path)
    root = top / "runs"
    for kind, mutation in CASES:
        if kind in RUN_FILES:
            victim = root / f"{kind}-{mutation}"
            shutil.copytree(root / "victim", victim)
            mutate(victim / RUN_FILES[kind], mutation, outside)
    dashboard_runs(root)
    pages_render(root)


@pytest.mark.parametrize("kind", sorted(ROOT_FILES))
def test_dashboard_pages_with_a_damaged_queue_sweep_or_results_file(base, tmp_path, dashboard_runs, kind):
    pages = ("views/train.py", "views/runs.py") if kind == "queue" else ("views/experiments.py",)
    for mutation in ("huge-int", "nested", "truncated", "folder", "fifo") if kind != "results-csv" else \
            ("truncated", "folder", "fifo", "link"):
        top, outside = fresh(base, tmp_path / mutation)
        mutate(top / "runs" / ROOT_FILES[kind], mutation, outside)
        dashboard_runs(top / "runs")
        pages_render(top / "runs", pages)
