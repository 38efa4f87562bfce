"""Sample quality: Fréchet distance in a classifier's 128-d features, with its floor and ceiling.

A Fréchet distance alone means little: it depends on the feature network and on the number of
samples N (its estimate is biased upwards at small N). So every number comes with two references
taken at the same N with the same classifier:

    floor    N real *training* images vs the test split: what a perfect generator would score;
    ceiling  N images of pure noise vs the test split: a sample that was never denoised, i.e.
             x_T ~ N(0, I) in the [-1, 1] model range, mapped to uint8 like any sample
             (pixel = round(clip(127.5 * (1 + z), 0, 255))); about 68 % grey levels, the rest black
             or white. The same definition for every run, whatever its pixel range.
and the ratio model / floor (1 is perfect). The class shares (the classifier's predicted-class
histogram of the samples), their normalised entropy H / ln 10 (1: every class equally often, 0: one
class only) and the mean top-class softmax confidence say whether the samples cover all classes and
look like *some* class at all.

For a class-conditional run the samples come with the labels they were asked for; the report then
adds the conditional accuracy (the share the classifier assigns to the requested class), the same
per class, and a Fréchet distance per class against that class's test images (about N/10 samples
each, so per-class figures are biased upwards and only compare at the same N).

The distance itself is torchmetrics' FrechetInceptionDistance with our classifier as its `feature`
module: it accumulates feature sums and cross-products in float64 and takes the trace of the
matrix square root from the eigenvalues of Σ_real·Σ_fake. The test-split statistics are the same
for every evaluation with one classifier, so they are cached next to the classifier file.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ..config import ConfigError
from ..data.datasets import ImageSet, to_uint8
from ..store.io import atomic_write_bytes
from .classifier import Classifier, FeatureExtractor, read_metadata

NOISE_PIXEL_RANGE = "symmetric"   # the noise ceiling's x_T is shown as if the model range were [-1, 1]
MIN_IMAGES = 2                    # a covariance needs two samples; compare numbers at N >= 1000
CACHE_VERSION = 1


# -- the pieces, each a plain function ----------------------------------------------------------------
def noise_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 28, 28): x_T ~ N(0, I) in the [-1, 1] range, mapped to pixels like any sample."""
    gen = torch.Generator().manual_seed(seed)
    return to_uint8(torch.randn((n, 1, 28, 28), generator=gen), NOISE_PIXEL_RANGE)[:, 0]


def real_subset(images: ImageSet, n: int, seed: int = 0) -> torch.Tensor:
    """n images drawn without replacement (seeded) from a split: the floor's 'perfect samples'."""
    if n > len(images):
        raise ConfigError(f"n = {n} is not allowed: the {images.split} split of {images.dataset} has only "
                          f"{len(images)} images to compare with")
    gen = torch.Generator().manual_seed(seed)
    return images.images[torch.randperm(len(images), generator=gen)[:n]]


def normalised_entropy(shares: torch.Tensor) -> float:
    """H(p) / ln K of a histogram p over K classes: 1 = uniform, 0 = a single class."""
    p = shares.double()
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(shares.numel())) if shares.numel() > 1 else 0.0


def class_statistics(logits: torch.Tensor, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Predicted-class shares (by name), their normalised entropy and the mean top-class confidence."""
    probs = logits.double().softmax(dim=1)                              # (N, K)
    counts = torch.bincount(probs.argmax(dim=1), minlength=len(class_names)).double()
    shares = counts / counts.sum()
    return {
        "class_shares": {name: round(float(s), 4) for name, s in zip(class_names, shares)},
        "class_entropy": normalised_entropy(shares),
        "mean_confidence": float(probs.max(dim=1).values.mean()),
    }


def frechet_metric(feature: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' FID around our feature module; the real statistics survive `reset()`.

    With a custom module torchmetrics passes the images through untouched (normalize=False keeps
    them uint8) and reads the feature size from `feature.num_features` instead of probing it
    with a dummy 299x299 RGB image.
    """
    return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=False)


def _check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(images):
        images = torch.as_tensor(images)
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]   # (N, 1, 28, 28), the ImageSet layout: the classifier's own (N, 28, 28)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ConfigError(f"{what} = {images.dtype} {tuple(images.shape)} is not allowed: expected uint8 "
                          "(N, 28, 28) or (N, 1, 28, 28)")
    if images.shape[0] < MIN_IMAGES:
        raise ConfigError(f"n = {images.shape[0]} is not allowed: the Fréchet distance needs at least "
                          f"{MIN_IMAGES} images (compare numbers taken at N >= 1000)")
    return images


# -- the evaluator -------------------------------------------------------------------------------------
@dataclass
class QualityReport:
    """One evaluation at sample count n; `to_dict` is what eval.json stores (plus the run's keys)."""
    n: int
    fd: float
    fd_floor: float
    fd_noise: float
    class_shares: dict[str, float] = field(default_factory=dict)
    class_entropy: float = 0.0
    mean_confidence: float = 0.0

    @property
    def fd_ratio(self) -> float:
        return self.fd / self.fd_floor if self.fd_floor > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "fd": round(self.fd, 4), "fd_floor": round(self.fd_floor, 4),
                "fd_noise": round(self.fd_noise, 4), "fd_ratio": round(self.fd_ratio, 4),
                "class_shares": self.class_shares, "class_entropy": round(self.class_entropy, 4),
                "mean_confidence": round(self.mean_confidence, 4)}


class QualityEvaluator:
    """Fréchet distances to one test split in one classifier's features.

    The test statistics (feature sum, sum of outer products, count: torchmetrics' own state) are
    computed once per classifier and test split and cached as `<dataset>.test-stats.safetensors`
    beside the classifier file, keyed by the sha256 of both.
    """

    def __init__(self, classifier: Classifier, test: ImageSet, device: torch.device | str = "cpu",
                 batch_size: int = 500) -> None:
        if test.dataset != classifier.dataset:
            raise ConfigError(f"dataset = {test.dataset!r} is not allowed: the classifier was fitted on "
                              f"{classifier.dataset!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size = {batch_size} is not allowed: it must be >= 1")
        self.classifier = classifier
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.classifier.model.to(self.device).eval()
        self.metric = frechet_metric(FeatureExtractor(classifier.model)).to(self.device)
        self.test = test  # kept for the per-class statistics of conditional runs
        self._test_features: torch.Tensor | None = None
        self.test_sha256 = hashlib.sha256(test.images.numpy().tobytes()).hexdigest()
        self.stats_from_cache = self._load_cached_stats()
        if not self.stats_from_cache:
            self._update(test.images, real=True)
            self._save_cached_stats()

    # The cache: torchmetrics' three real-side states, float64, plus what they were computed from.
    @property
    def cache_path(self) -> Path | None:
        path = self.classifier.path
        return path.with_name(f"{self.classifier.dataset}.test-stats.safetensors") if path else None

    def _cache_key(self) -> dict[str, str]:
        return {"cache_version": str(CACHE_VERSION), "classifier_sha256": self.classifier.sha256,
                "test_sha256": self.test_sha256}

    def _load_cached_stats(self) -> bool:
        path = self.cache_path
        if path is None or not path.is_file() or not self.classifier.sha256:
            return False
        try:
            blob = path.read_bytes()
            if any(read_metadata(blob).get(k) != v for k, v in self._cache_key().items()):
                return False  # another classifier or test split: recompute and overwrite
            state = load(blob)
            # Read and check all three first; assign only when every one is there and fits, so a
            # damaged cache can never leave half of the metric's state overwritten.
            feature_sum = state["feature_sum"].to(self.device, torch.float64)
            outer_sum = state["feature_outer_sum"].to(self.device, torch.float64)
            count = state["count"].to(self.device, torch.long).reshape(())
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
            return False  # a damaged cache is only a slower evaluation
        dim = self.metric.real_features_sum.shape
        if feature_sum.shape != dim or outer_sum.shape != self.metric.real_features_cov_sum.shape \
                or int(count) < 2 or not bool(torch.isfinite(feature_sum).all() and torch.isfinite(outer_sum).all()):
            return False
        self.metric.real_features_sum, self.metric.real_features_cov_sum = feature_sum, outer_sum
        self.metric.real_features_num_samples = count
        return True

    def _save_cached_stats(self) -> None:
        path = self.cache_path
        if path is None or not self.classifier.sha256:
            return
        tensors = {"feature_sum": self.metric.real_features_sum.cpu().clone(),
                   "feature_outer_sum": self.metric.real_features_cov_sum.cpu().clone(),
                   "count": self.metric.real_features_num_samples.cpu().reshape(1).clone()}
        try:
            atomic_write_bytes(path, save(tensors, metadata=self._cache_key()))
        except OSError:
            pass  # a read-only cache folder only costs speed

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for start in range(0, len(images), self.batch_size):
            self.metric.update(images[start:start + self.batch_size].to(self.device), real=real)

    # What callers use.
    def frechet_distance(self, images: torch.Tensor) -> float:
        """Fréchet distance between uint8 (N, 28, 28) images and the test split."""
        images = _check_images(images, "images")
        self.metric.reset()  # clears the fake side only (reset_real_features=False)
        self._update(images, real=False)
        value = float(self.metric.compute())
        self.metric.reset()
        return max(value, 0.0)  # tiny negatives are round-off of an exact match

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_images(images, "images")
        out = [self.classifier.model(images[s:s + self.batch_size].to(self.device)).cpu()
               for s in range(0, len(images), self.batch_size)]
        return torch.cat(out)

    def class_statistics(self, images: torch.Tensor) -> dict[str, Any]:
        return class_statistics(self.logits(images), self.classifier.class_names)

    # Class-conditional samples: features per image, the test split's features, the report.
    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 128) classifier features of uint8 (N, 28, 28) images, on the CPU."""
        return torch.cat([self.classifier.model.features(images[s:s + self.batch_size].to(self.device)).float().cpu()
                          for s in range(0, len(images), self.batch_size)])

    def test_features(self) -> torch.Tensor:
        """The test split's features, computed once per evaluator (10k images: seconds)."""
        if self._test_features is None:
            self._test_features = self.features(self.test.images)
        return self._test_features

    def conditional(self, images: torch.Tensor, labels: torch.Tensor) -> "ConditionalReport":
        """Samples drawn for `labels`: the share classified as asked, per class, and per-class distances."""
        images = _check_images(torch.as_tensor(images), "images")
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (len(images),):
            raise ConfigError(f"labels = {tuple(labels.shape)} is not allowed: give one label per image "
                              f"({len(images)})")
        names = self.classifier.class_names
        predicted = self.logits(images).argmax(dim=1)
        fake, real = self.features(images), self.test_features()
        accuracy, distance, counts = {}, {}, {}
        for k in sorted(set(labels.tolist())):
            mine = labels == k
            counts[names[k]] = int(mine.sum())
            accuracy[names[k]] = float((predicted[mine] == k).double().mean())
            if counts[names[k]] >= MIN_IMAGES:  # a covariance needs two samples
                distance[names[k]] = frechet_distance_of_features(real[self.test.labels == k], fake[mine])
        return ConditionalReport(float((predicted == labels).double().mean()), accuracy, distance, counts)

    def floor(self, train: ImageSet, n: int, seed: int = 0) -> float:
        if train.dataset != self.classifier.dataset:
            raise ConfigError(f"dataset = {train.dataset!r} is not allowed: the classifier was fitted on "
                              f"{self.classifier.dataset!r}")
        return self.frechet_distance(real_subset(train, n, seed))

    def noise_ceiling(self, n: int, seed: int = 0) -> float:
        return self.frechet_distance(noise_images(n, seed))

    def evaluate(self, images: torch.Tensor, train: ImageSet, seed: int = 0) -> QualityReport:
        """The full report for N samples: distance, floor and ceiling at the same N, class shares."""
        images = _check_images(torch.as_tensor(images), "images")
        n = int(images.shape[0])
        return QualityReport(n=n, fd=self.frechet_distance(images), fd_floor=self.floor(train, n, seed),
                             fd_noise=self.noise_ceiling(n, seed), **self.class_statistics(images))


# -- class-conditional samples ----------------------------------------------------------------------------
def frechet_distance_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||μ_r − μ_f||² + tr Σ_r + tr Σ_f − 2 tr sqrt(Σ_r Σ_f), in float64, from (N, D) features.

    tr sqrt(Σ_r Σ_f) is the sum of the square roots of the eigenvalues of Σ_r Σ_f (real and >= 0 up to
    round-off, as the product of two PSD matrices), the way torchmetrics computes it.
    """
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    root_trace = torch.linalg.eigvals(cov_r @ cov_f).real.clamp(min=0).sqrt().sum()
    value = (mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * root_trace
    return max(float(value), 0.0)


@dataclass
class ConditionalReport:
    """How well samples drawn for given classes show those classes."""
    conditional_accuracy: float
    per_class_accuracy: dict[str, float]
    per_class_fd: dict[str, float]
    per_class_n: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"conditional_accuracy": round(self.conditional_accuracy, 4),
                "per_class_accuracy": {k: round(v, 4) for k, v in self.per_class_accuracy.items()},
                "per_class_fd": {k: round(v, 4) for k, v in self.per_class_fd.items()},
                "per_class_n": self.per_class_n}

