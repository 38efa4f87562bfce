"""Shared fixtures: tiny generated images and tiny configs, so unit tests take seconds on 2 cores.

What costs time in this suite is training and starting interpreters, so both are shared:
- `trained_runs(config, name)` trains a run of a config ONCE per session (per xdist worker) and
  `trained_tiny_run` is the tiny one; `tiny_run` hands each test its own copy (`copy_run`), so a test
  may damage, resume or delete it without touching another's.
- `run_core(*argv)` runs `python -m core ...` in this process and returns what a subprocess would
  (returncode, stdout, stderr). Keep real subprocesses only where the process boundary is the point
  (signals, torchrun, an interpreter's own exit status).
- `pytest_collection_modifyitems` puts the load-sensitive modules in one xdist group, so under
  `make test` (pytest -n 2 --dist loadgroup) they run one after another on one worker.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pytest
import torch

from core.config import ModelConfig, RunConfig, ScheduleConfig, TrainConfig
from core.data.datasets import ImageSet

REPO = Path(__file__).resolve().parents[1]
# Tests share 2 cores with each other's subprocesses; one thread each avoids oversubscription.
# An explicit OMP_NUM_THREADS wins: on a busy machine two spinning threads per process run ~8x slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


def make_tiny_images(n: int = 256, seed: int = 0) -> ImageSet:
    """Bright rectangles on black, 10 classes by position: enough structure to learn in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros((n, 1, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    for i in range(n):
        r, c = divmod(int(labels[i]), 5)
        top, left = 4 + r * 10, 2 + c * 5
        images[i, 0, top:top + 10, left:left + 5] = int(torch.randint(150, 256, (1,), generator=gen))
    return ImageSet(images=images, labels=labels, dataset="fashion_mnist", split="train")


def tiny_config(**train_changes) -> RunConfig:
    """A run that trains in about a second: small ImprovedUNet, T = 20, CPU."""
    train = TrainConfig(optimizer="adamw", lr=2e-3, batch_size=32, epochs=1,
                        max_steps=6, device="cpu", sample_every_epochs=0, grid_steps=5,
                        checkpoint_every_s=0.0, log_every=2, channels_last=False, pixel_range="symmetric")
    return RunConfig(
        model=ModelConfig(name="improved_unet", base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                          attention=False),
        schedule=ScheduleConfig(timesteps=20),
        train=replace(train, **train_changes),
    )


def as_format(config: dict, version: int) -> dict:
    """A current config dict written as format `version` (1-4): the data section folded back into
    `train.dataset`, as every run under checkpoints/ holds it."""
    old = {k: v for k, v in config.items() if k != "data"}
    old["train"] = {**config["train"], "dataset": config.get("data", {}).get("dataset", "fashion_mnist")}
    return {**old, "format_version": version}


@pytest.fixture
def tiny_images() -> ImageSet:
    return make_tiny_images()


class TrainedRuns:
    """Finished runs trained at most once per session for each (config, number of tiny images).
    The folders are shared: read them, or copy_run them into your tmp_path to change them."""

    def __init__(self, root: Path):
        self.root = root
        self._trained: dict[tuple[str, int], Path] = {}

    def __call__(self, config: RunConfig, name: str = "tiny", n_images: int = 256) -> Path:
        key = (config.to_json(), n_images)
        if key not in self._trained:
            from core.store import runs
            from core.train.training import train_run
            run_dir = runs.create_run(self.root / f"r{len(self._trained)}", name, config)
            train_run(run_dir, images=make_tiny_images(n_images))
            self._trained[key] = run_dir
        return self._trained[key]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> TrainedRuns:
    """trained_runs(config, name) -> a finished run folder of that config, trained once per session."""
    return TrainedRuns(tmp_path_factory.mktemp("session-runs"))


@pytest.fixture(scope="session")
def trained_tiny_run(trained_runs) -> Path:
    """The `tiny_run` recipe trained once per session: read it, never change it (copy it with copy_run)."""
    return trained_runs(tiny_config(ema_decay=0.9), "tiny")


def copy_run(source: Path, runs_dir: Path, name: str | None = None) -> Path:
    """A private copy of a run folder in `runs_dir` (created if missing): what a test may change."""
    target = Path(runs_dir) / (name or source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture
def tiny_run(tmp_path, trained_tiny_run) -> Path:
    """A finished tiny run folder (with EMA) in a temporary runs dir: tmp_path/runs/tiny, this test's own."""
    return copy_run(trained_tiny_run, tmp_path / "runs")


# -- the dashboard in AppTest ------------------------------------------------------------------------------
def poll_app(at, done: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Rerun the page (each run polls its background job, as the page's fragment does) until `done()`,
    failing on an error shown on the way or after `timeout` seconds: a time, not a count of reruns, so
    the wait holds on a loaded machine as well as on a quiet one."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} did not finish in {timeout:.0f} s"
        assert not at.error and not at.exception, (at.error or at.exception)[0].value
        time.sleep(0.1)
        at.run()
    assert not at.exception


def generate(at, timeout: float = 120.0) -> dict:
    """Click the Reverse page's Generate and wait for its result (the session's `rev_result`)."""
    at.button(key="rev_generate").click().run()
    poll_app(at, lambda: "rev_result" in at.session_state, "generation", timeout)
    return at.session_state["rev_result"]


def stop_queue_worker() -> None:
    """End the dashboard process's queue worker, if a test started one: never leave it into the next test."""
    from dashboard.state import job_manager
    runner = job_manager().queue_runner
    if runner is not None:
        runner.stop()
        assert runner.join(120)


# -- the CLI in this process -----------------------------------------------------------------------------
def _interpreter_warning_filters() -> None:
    """The filters a fresh `python -m core` starts with (the warnings module's documented default
    filter list), in place of pytest's, so a warning it would print lands in the captured stderr here."""
    warnings.resetwarnings()
    for category in (ImportWarning, ResourceWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


@dataclass(frozen=True)
class CoreResult:
    """What subprocess.run(capture_output=True, text=True) returns, for `python -m core` run in-process."""
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def run_core(*argv: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> CoreResult:
    """`python -m core *argv` without a new interpreter: main()'s return or SystemExit code becomes the
    exit status, an uncaught exception a traceback on stderr and status 1, as in a real process.
    `env`: variables set for the call (DDPM_DATA_ROOT defaults to the repo's data/). Not thread-safe:
    it swaps sys.stdout/sys.stderr, the working folder and os.environ for the call."""
    from core.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    changes = {"DDPM_DATA_ROOT": str(REPO / "data"), **(env or {})}
    saved_env = {key: os.environ.get(key) for key in changes}
    saved_cwd = os.getcwd()
    os.environ.update(changes)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            _interpreter_warning_filters()
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except Exception:  # what the interpreter would print before exiting 1
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return CoreResult(list(argv), code, out.getvalue(), err.getvalue())


# -- xdist grouping ----------------------------------------------------------------------------------------
# Modules whose tests time real processes (signals, kills, torchrun, a browser, a benchmark): on one worker,
# one after another, so two of them never fight over the two cores. New modules of that kind go here.
LOAD_SENSITIVE = {"test_browser_journey.py", "test_distributed.py", "test_torn_and_killed.py",
                  "test_fault_injection.py", "test_bench.py", "test_hostile_runs.py"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in LOAD_SENSITIVE:
            item.add_marker(pytest.mark.xdist_group("load-sensitive"))
