"""One evaluation entry (what eval.json holds) from a loaded run and a sampler setting, and the
dataset's classifier loaded or fitted: shared by `python -m core eval` and the dashboard's
background `EvaluationJob`, so both write the same entries.
"""
from __future__ import annotations

import sys

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..store import runs
from ..config import SampleConfig
from ..data.datasets import ImageSet, load_images
from ..device import resolve_device
from ..diffusion.guidance import guided_nfe
from ..diffusion.sampling import ReverseStep, collect, reverse_process, total_steps
from ..diffusion.schedule import NoiseScheduler
from .classifier import Classifier, ClassifierError, FitConfig, classifier_dir, fit, load_classifier, save_classifier
from .frechet import QualityEvaluator
from .own_data import class_names_of, fit_on_training_split, fitted_classifier, run_data, uses_fingerprint

# wrap(process, total, description) -> the same steps (a progress bar, a counter, a cancel check)
StepWrapper = Callable[[Iterator[ReverseStep], int, str], Iterator[ReverseStep]]
FitProgress = Callable[[int, int, float], None]


def now_stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def setting_name(config: SampleConfig, steps: int, raw_weights: bool) -> str:
    """The eval.json key of a sampler setting: ddpm-1000, ddim-50, dpmpp2m-sde-20-logsnr, ...-raw."""
    return replace(config, steps=steps).setting + ("-raw" if raw_weights else "")


def load_or_fit_classifier(dataset: str, directory: str | Path | None = None, device: torch.device | str = "cpu",
                           data_root: str | None = None, fit_config: FitConfig | None = None,
                           progress: FitProgress | None = None) -> tuple[Classifier, bool]:
    """The dataset's classifier and whether it had to be fitted now (missing, damaged or outdated)."""
    try:
        classifier = load_classifier(dataset, directory, device=device)
        if classifier.note:  # a fallback is said out loud (the server's log for the dashboard's jobs)
            print(f"note: {classifier.note}", file=sys.stderr)
        return classifier, False
    except ClassifierError:
        pass
    fitted = fit(load_images(dataset, "train", data_root), load_images(dataset, "test", data_root),
                 fit_config or FitConfig(), device=device, progress=progress)
    # Written into the folder given (else $DDPM_CLASSIFIER_DIR, else data/classifiers): never over a
    # classifier shipped with the repository.
    return save_classifier(fitted, classifier_dir(directory) / f"{dataset}.safetensors"), True


def sample_images(config: SampleConfig, loaded: runs.LoadedRun, scheduler: NoiseScheduler, device: torch.device,
                  wrap: StepWrapper | None = None, labels: torch.Tensor | None = None,
                  guidance: float = 1.0) -> torch.Tensor | None:
    """`config.n` uint8 samples of the run (None when `wrap` ended the sampling early)."""
    steps = config.resolved_steps(scheduler.num_timesteps)
    train_config = loaded.config.train
    process = reverse_process(loaded.model, scheduler, config, pixel_range=train_config.pixel_range,
                              clip_default=train_config.clip_denoised, device=device, labels=labels,
                              guidance=guidance, prediction=train_config.prediction,
                              shape=loaded.config.data.shape)
    total = total_steps(config, scheduler)
    if wrap is not None:
        process = wrap(process, total, f"{config.sampler} {steps} steps, {config.n} images"
                       + (f", guidance {guidance:g}" if labels is not None else ""))
    result = collect(process, pixel_range=train_config.pixel_range)
    if len(result.images) < config.n:
        return None
    return torch.from_numpy(result.images)


def score_setting(config: SampleConfig, loaded: runs.LoadedRun, scheduler: NoiseScheduler,
                  evaluator: QualityEvaluator, train: ImageSet, raw_weights: bool, device: torch.device,
                  wrap: StepWrapper | None = None, labels: torch.Tensor | None = None,
                  guidance: float = 1.0) -> dict[str, Any] | None:
    """Sample `config.n` images and measure them: the eval.json entry (None when `wrap` ended early).
    A conditional run passes one label per image and γ: the entry adds its conditional figures."""
    steps = config.resolved_steps(scheduler.num_timesteps)
    train_config = loaded.config.train
    started_at, started = now_stamp(), time.perf_counter()
    images = sample_images(config, loaded, scheduler, device, wrap, labels, guidance)
    if images is None:
        return None
    sampling_s = time.perf_counter() - started
    eval_start = time.perf_counter()
    report = evaluator.evaluate(images, train, seed=config.seed)
    conditional = {}
    if labels is not None:  # keys only conditional runs have: unconditional entries stay as they were
        conditional = {"guidance": guidance, **evaluator.conditional(images, labels).to_dict()}
    classifier = evaluator.classifier
    setting = setting_name(config, steps, raw_weights) + (f"-g{guidance:g}" if labels is not None else "")
    return {"setting": setting,
            "sampler": config.sampler, "steps": steps,
            "nfe": steps if labels is None else steps * guided_nfe(guidance), **conditional,
            "eta": config.eta if config.sampler == "ddim" else None,
            "spacing": config.spacing if config.sampler != "ddpm" else None,
            "clip": config.resolved_clip(train_config.clip_denoised),
            "weights": "ema" if loaded.used_ema else "raw", "seed": config.seed, **report.to_dict(),
            "dataset": loaded.config.data.dataset, "classifier_accuracy": round(classifier.test_accuracy, 4),
            "classifier_sha256": classifier.sha256[:12], "device": str(device),
            "started_at": started_at, "finished_at": now_stamp(), "seconds_sampling": round(sampling_s, 1),
            "seconds_eval": round(time.perf_counter() - eval_start, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def run_classifier_for(train: ImageSet, classifier_dir: str | Path | None, device: torch.device,
                       data_root: str | None = None, fit_config: FitConfig | None = None,
                       progress: FitProgress | None = None) -> Classifier:
    """The classifier that scores a run's data: the built-in dataset's own (fitted once if missing), or
    for other data the one fitted on exactly these images (fitted now when there is none)."""
    if uses_fingerprint(train.dataset):
        names = class_names_of(train)
        return fitted_classifier(train, names, classifier_dir, device) or \
            fit_on_training_split(train, names, classifier_dir, fit_config or FitConfig(), device=device,
                                  progress=progress)
    return load_or_fit_classifier(train.dataset, classifier_dir, device, data_root, fit_config, progress)[0]


def run_evaluator(config, classifier_dir: str | Path | None, device: torch.device, data_root: str | None = None,
                  fit_config: FitConfig | None = None,
                  progress: FitProgress | None = None) -> tuple[ImageSet, QualityEvaluator]:
    """(training images, evaluator against the run's reference images) for a run's config."""
    train, test = run_data(config, data_root)
    classifier = run_classifier_for(train, classifier_dir, device, data_root, fit_config, progress)
    return train, QualityEvaluator(classifier, test, device)


def evaluate_run(run_dir: str | Path, config: SampleConfig, *, device: torch.device | str = "cpu",
                 use_ema: bool = True, classifier_dir: str | Path | None = None, data_root: str | None = None,
                 wrap: StepWrapper | None = None) -> dict[str, Any] | None:
    """Score one unconditional run folder at one sampler setting and add the entry to its eval.json:
    what the run queue and a sweep do after each training (the shipped classifier where there is one).
    Returns the entry, or None when `wrap` ended the sampling early (nothing is written then)."""
    run_dir, device = Path(run_dir), resolve_device(device)
    loaded = runs.load_model(run_dir, use_ema=use_ema, device=device)
    scheduler = NoiseScheduler(loaded.config.schedule)
    config.resolved_steps(scheduler.num_timesteps)  # a step count above T fails before any work
    train, evaluator = run_evaluator(loaded.config, classifier_dir, device, data_root)
    raw_weights = not loaded.used_ema and (run_dir / "ema.safetensors").exists()
    entry = score_setting(config, loaded, scheduler, evaluator, train, raw_weights, device, wrap=wrap)
    if entry is not None:
        runs.append_eval(run_dir, entry)
    return entry
