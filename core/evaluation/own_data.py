"""Scores for data without a shipped classifier (an image folder): the feature classifier is fitted on
the run's own training split and stored per dataset fingerprint, and which images a run trained on
and which it never saw (the memorization check's reference) are decided here, in one place.

Built-in datasets (FashionMNIST, MNIST) keep their named classifier (the shipped one for FashionMNIST)
and their test split. Any other dataset name is scored with the classifier of its exact images:
`fit_on_training_split` holds out HELDOUT_SHARE of them (seeded) to measure its accuracy, fits on the
rest, and writes data/classifiers/<dataset>-<fingerprint>.safetensors, never a shipped file.
"""
from __future__ import annotations

import os

import torch

from ..config import ConfigError, RunConfig
from ..data.datasets import CLASS_NAMES, ImageSet
from ..data.sources import load_run_images
from .classifier import (Classifier, ClassifierNotFoundError, FitConfig, ProgressFn, dataset_fingerprint, fit,
                         fingerprint_path, load_fingerprinted, save_classifier)

HELDOUT_SHARE = 0.1   # of a training split without a test split: measures the classifier's accuracy
HELDOUT_SEED = 0
# An image folder has one split: what the run trained on. Its "held-out" images are then a seeded
# subset of the training images, marked with this split name, and the memorization check measures
# their distance to the nearest *other* training image (leave-one-out) as the real-data baseline.
IN_TRAIN_SPLIT = "train-subset"


def uses_fingerprint(dataset: str) -> bool:
    """True for data scored with a classifier fitted on its exact images (anything but the built-ins)."""
    return dataset not in CLASS_NAMES


def split_heldout(data: ImageSet, share: float = HELDOUT_SHARE, seed: int = HELDOUT_SEED) -> tuple[ImageSet, ImageSet]:
    """A seeded random split of one ImageSet into (fit part, held-out part); the held-out part has at
    least one image, the fit part at least two."""
    n = len(data)
    held = max(1, round(n * share))
    if n - held < 2:
        raise ConfigError(f"images = {n} is not allowed: fitting a classifier with a held-out part needs at "
                          "least 3 labelled images (use a few per class at the very least)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    pick = lambda index, split: ImageSet(images=data.images[index], labels=data.labels[index],  # noqa: E731
                                         dataset=data.dataset, split=split)
    return pick(order[held:], "train"), pick(order[:held], "heldout")


def fit_on_training_split(data: ImageSet, class_names: tuple[str, ...], directory: str | os.PathLike | None = None,
                          config: FitConfig = FitConfig(), device: torch.device | str = "cpu",
                          progress: ProgressFn | None = None) -> Classifier:
    """Fit the classifier on `data` less a held-out part (its accuracy) and store it by fingerprint."""
    fingerprint = dataset_fingerprint(data, class_names)
    fit_part, heldout = split_heldout(data)
    fitted = fit(fit_part, heldout, config, device=device, progress=progress, class_names=tuple(class_names),
                 fingerprint=fingerprint)
    return save_classifier(fitted, fingerprint_path(data.dataset, fingerprint, directory))


def fitted_classifier(data: ImageSet, class_names: tuple[str, ...], directory: str | os.PathLike | None = None,
                      device: torch.device | str = "cpu") -> Classifier | None:
    """The classifier fitted on exactly these images, or None when there is none yet."""
    try:
        return load_fingerprinted(data.dataset, dataset_fingerprint(data, class_names), directory, device)
    except ClassifierNotFoundError:
        return None


def run_data(config: RunConfig, data_root: str | None = None) -> tuple[ImageSet, ImageSet]:
    """(training split, reference images) of a run's data at the run's shape: the train and test splits
    of a built-in dataset; for an image folder all its images and a seeded HELDOUT_SHARE of them
    (split IN_TRAIN_SPLIT: a folder holds nothing out, so these were trained on; see above)."""
    data = config.data
    train = load_run_images(data, "train", data_root)
    if data.dataset != "folder":
        return train, load_run_images(data, "test", data_root)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(HELDOUT_SEED))
    picked = order[:max(2, round(len(train) * HELDOUT_SHARE))]  # two at least: a covariance needs two
    return train, ImageSet(images=train.images[picked], labels=train.labels[picked], dataset=train.dataset,
                           split=IN_TRAIN_SPLIT, class_names=train.class_names)


def trained_images(config: RunConfig, train: ImageSet) -> torch.Tensor:
    """The images the run actually trained on: the first `limit_images` of its split, as training takes them."""
    limit = config.train.limit_images
    return train.images[:limit] if limit else train.images


def class_names_of(data: ImageSet) -> tuple[str, ...]:
    return tuple(data.class_names)
