"""The memorization check of a run folder: sample, find each sample's nearest training image, and
store the figures in eval.json and the "sample | nearest training image" grid in the run's samples/.
Shared by `python -m core eval --run NAME --nearest` and the dashboard (no streamlit here).

The reference is what the run trained on (its first `limit_images` training images, as training
took them); the held-out real images are the dataset's test split (a seeded subset of N). Distances
in features use the dataset's classifier when one exists (never fitted here: the pixels suffice).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..config import SampleConfig
from ..device import resolve_device
from ..diffusion.guidance import default_guidance, even_labels
from ..diffusion.schedule import NoiseScheduler
from ..store import checkpoint, runs
from ..store.io import atomic_write_bytes
from . import memorization
from .classifier import Classifier, ClassifierError, load_classifier
from .frechet import real_subset
from .own_data import IN_TRAIN_SPLIT, class_names_of, fitted_classifier, run_data, trained_images, uses_fingerprint
from .scoring import StepWrapper, now_stamp, sample_images, setting_name

GRID_PREFIX = "nearest-"


def feature_classifier(train, classifier_dir: str | Path | None, device: torch.device) -> Classifier | None:
    """The dataset's classifier if one exists (the shipped one, or one fitted on these images), else None."""
    if uses_fingerprint(train.dataset):
        return fitted_classifier(train, class_names_of(train), classifier_dir, device)
    try:
        return load_classifier(train.dataset, classifier_dir, device=device)
    except ClassifierError:
        return None


def feature_fn(classifier: Classifier, device: torch.device):
    """uint8 images -> the classifier's features, without gradients, on `device`."""
    model = classifier.model.to(device).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.features(x.to(device))
    return features


def check_run(run_dir: str | Path, config: SampleConfig, *, device: torch.device | str = "cpu",
              use_ema: bool = True, classifier_dir: str | Path | None = None, data_root: str | None = None,
              wrap: StepWrapper | None = None) -> dict[str, Any] | None:
    """Sample `config.n` images of the run, judge them for copies, store the entry and the grid.
    Returns the eval.json entry, or None when `wrap` ended the sampling early (nothing written then)."""
    run_dir, device = Path(run_dir), resolve_device(device)
    loaded = runs.load_model(run_dir, use_ema=use_ema, device=device)
    scheduler = NoiseScheduler(loaded.config.schedule)
    steps = config.resolved_steps(scheduler.num_timesteps)  # a step count above T fails before any work
    train, heldout_split = run_data(loaded.config, data_root)  # a missing dataset fails before sampling
    reference = trained_images(loaded.config, train)
    classifier = feature_classifier(train, classifier_dir, device)
    labels, guidance = None, 1.0
    if loaded.config.model.conditional:  # every class equally often, at the run's default γ
        labels, guidance = even_labels(config.n, loaded.config.model.num_classes), default_guidance(loaded.config)
    started_at, started = now_stamp(), time.perf_counter()
    samples = sample_images(config, loaded, scheduler, device, wrap, labels, guidance)
    if samples is None:
        return None
    sampling_s = time.perf_counter() - started
    heldout = real_subset(heldout_split, min(config.n, len(heldout_split)), config.seed)
    features = None if classifier is None else feature_fn(classifier, device)
    report = memorization.check(samples, reference, heldout, features,
                                heldout_in_train=heldout_split.split == IN_TRAIN_SPLIT)
    setting = GRID_PREFIX + setting_name(config, steps, not loaded.used_ema and (run_dir / "ema.safetensors").exists())
    grid = checkpoint.real_folder(run_dir / "samples") / f"{setting}.png"
    atomic_write_bytes(grid, memorization.pairs_grid_png(samples, reference, report))
    entry = {"setting": setting, "kind": "memorization", "sampler": config.sampler, "steps": steps,
             "seed": config.seed, "weights": "ema" if loaded.used_ema else "raw", **report.to_dict(),
             "dataset": loaded.config.data.dataset,
             "classifier_sha256": classifier.sha256[:12] if classifier is not None else "",
             "grid": f"samples/{grid.name}", "device": str(device), "started_at": started_at,
             "finished_at": now_stamp(), "seconds_sampling": round(sampling_s, 1),
             "seconds": round(time.perf_counter() - started, 1)}
    runs.append_eval(run_dir, entry)
    return entry
