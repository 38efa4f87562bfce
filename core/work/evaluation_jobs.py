"""Evaluation in the background: `EvaluationJob` samples a run at one setting and scores it (the
dashboard's Evaluate panel and the queue worker) and records its pace for core.work.estimates;
`NearestCheckJob` runs the memorization check (core.evaluation.nearest) with the same phases and
progress; `EvaluationManager` keeps one of either per process."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..store import runs
from ..config import SampleConfig
from ..device import resolve_device
from ..evaluation.classifier import FitConfig, classifier_path
from ..evaluation.nearest import GRID_PREFIX, check_run
from ..evaluation.own_data import uses_fingerprint
from ..evaluation.scoring import run_evaluator, score_setting, setting_name
from ..diffusion.sampling import total_steps
from ..diffusion.schedule import NoiseScheduler
from . import estimates
from .background import JobBusy, ReportingJob

PHASES = ("loading", "fitting classifier", "sampling", "scoring", "done")


@dataclass(frozen=True)
class EvaluationStatus:
    run_name: str
    setting: str        # e.g. dpmpp2m-20 (the eval.json key)
    state: str          # running, finished, failed, cancelled
    phase: str          # one of PHASES
    done: int           # reverse steps done (phase sampling) or classifier steps (fitting)
    total: int
    elapsed_s: float
    eta_s: float | None
    error: str | None
    entry: dict[str, Any] | None
    kind: str = "fd"    # "fd" (Fréchet distance) or "nearest" (the memorization check)

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0

    @property
    def active(self) -> bool:
        return self.state == "running"


def classifier_ready(dataset: str, directory: str | os.PathLike | None = None) -> bool:
    """Whether scoring can start without a fit; own data (an image folder) may need one: said as not ready."""
    if uses_fingerprint(dataset):
        return False
    return classifier_path(dataset, directory).is_file()


class EvaluationJob(ReportingJob):
    """Score one run at one sampler setting in the background, as `python -m core eval` does, and add
    the entry to its eval.json. Fits the dataset's classifier first when it is missing."""

    thread_name = "evaluation"
    kind = "fd"

    def __init__(self, run_dir: Path, config: SampleConfig, *, use_ema: bool = True,
                 device: torch.device | str = "cpu", classifier_dir: str | os.PathLike | None = None,
                 data_root: str | None = None, fit_config: FitConfig | None = None):
        super().__init__()
        self.run_dir, self.config = Path(run_dir), config
        self._use_ema, self._device = use_ema, resolve_device(device)
        self._classifier_dir, self._data_root, self._fit_config = classifier_dir, data_root, fit_config
        self._phase = "loading"
        self._done, self._total = 0, 0
        self._phase_started = self._started
        self._entry: dict[str, Any] | None = None
        self._setting = config.setting

    def _set_phase(self, phase: str, total: int = 0) -> None:
        with self._lock:
            self._phase, self._done, self._total = phase, 0, total
            self._phase_started = time.perf_counter()

    def _on_fit_step(self, done: int, total: int, loss: float) -> None:
        del loss
        with self._lock:
            self._done, self._total = done, total

    def _sampling_phase(self, steps, total: int, description: str):
        """score_setting's step wrapper: the sampling phase, counted, then the scoring phase."""
        del description
        self._set_phase("sampling", total)
        yield from self._counted(steps)
        if not self.stop_requested:
            self._set_phase("scoring")  # features of the samples, the floor and the noise ceiling

    def work(self) -> None:
        loaded = runs.load_model(self.run_dir, use_ema=self._use_ema, device=self._device)
        scheduler = NoiseScheduler(loaded.config.schedule)
        steps = self.config.resolved_steps(scheduler.num_timesteps)
        raw_weights = not loaded.used_ema and (self.run_dir / "ema.safetensors").exists()
        with self._lock:
            self._setting = setting_name(self.config, steps, raw_weights)
        if not classifier_ready(loaded.config.data.dataset, self._classifier_dir):
            self._set_phase("fitting classifier")
        train, evaluator = run_evaluator(loaded.config, self._classifier_dir, self._device, self._data_root,
                                         self._fit_config, progress=self._on_fit_step)
        if self.stop_requested:
            return self._finish("cancelled")
        self._set_phase("scoring")  # the test statistics, once per classifier
        entry = score_setting(self.config, loaded, scheduler, evaluator, train, raw_weights, self._device,
                              wrap=self._sampling_phase)
        if entry is None:
            return self._finish("cancelled")
        runs.append_eval(self.run_dir, entry)
        work = estimates.Work("sample", estimates.network_key(loaded.config.model, loaded.config.data.shape), self._device.type,
                              min(self.config.n, self.config.batch_size), self.config.sampler)
        estimates.record(self.run_dir.parent, work, entry["seconds_sampling"], total_steps(self.config, scheduler))
        with self._lock:
            self._entry, self._setting = entry, entry["setting"]
        self._finish("finished")

    def _finish(self, state: str) -> None:
        with self._lock:
            self._state, self._phase = state, "done"
            self._ended = time.perf_counter()

    def snapshot(self) -> EvaluationStatus:
        with self._lock:
            now = time.perf_counter()
            end = self._ended if self._ended is not None else now
            eta = None
            if self._state == "running" and self._done and self._total:
                eta = (now - self._phase_started) / self._done * (self._total - self._done)
            return EvaluationStatus(self.run_dir.name, self._setting, self._state, self._phase, self._done,
                                    self._total, end - self._started, eta, self._error,
                                    dict(self._entry) if self._entry else None, self.kind)


class NearestCheckJob(EvaluationJob):
    """The memorization check of one run in the background, as `python -m core eval --nearest` does:
    sample, find each sample's nearest training image, add the entry to eval.json and write the grid.
    Only the work differs from `EvaluationJob` (phases: loading, sampling, scoring = the search)."""

    thread_name = "memorization check"
    kind = "nearest"

    def __init__(self, run_dir: Path, config: SampleConfig, **kwargs: Any):
        super().__init__(run_dir, config, **kwargs)
        self._setting = GRID_PREFIX + config.setting  # the exact name (steps resolved) once it is done

    def work(self) -> None:
        entry = check_run(self.run_dir, self.config, device=self._device, use_ema=self._use_ema,
                          classifier_dir=self._classifier_dir, data_root=self._data_root,
                          wrap=self._sampling_phase)
        if entry is None:
            return self._finish("cancelled")
        with self._lock:
            self._entry, self._setting = entry, entry["setting"]
        self._finish("finished")


JOB_KINDS: dict[str, type[EvaluationJob]] = {"fd": EvaluationJob, "nearest": NearestCheckJob}


class EvaluationManager:
    """At most one running `EvaluationJob` (or `NearestCheckJob`) per process (they share the CPU with
    training); the last one stays available so a page can show how it ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: EvaluationJob | None = None

    @property
    def job(self) -> EvaluationJob | None:
        with self._lock:
            return self._job

    def start(self, run_dir: str | os.PathLike, config: SampleConfig, *, kind: str = "fd",
              **kwargs: Any) -> EvaluationJob:
        """Start a job of `kind` ("fd": score it; "nearest": check it for copies); JobBusy if one runs."""
        if kind not in JOB_KINDS:
            raise ValueError(f"evaluation kind = {kind!r} is not allowed: use one of {', '.join(JOB_KINDS)}")
        with self._lock:
            if self._job is not None and self._job.alive:
                raise JobBusy(f"run {self._job.run_dir.name!r} is being evaluated: one evaluation at a time. "
                              "Cancel it (or wait for it to finish) before starting another.")
            self._job = JOB_KINDS[kind](Path(run_dir), config, **kwargs)
            self._job.start()
            return self._job
