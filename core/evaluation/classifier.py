"""A small CNN classifier per dataset: its 128-d penultimate features measure sample quality.

No Inception weights exist offline, so the Fréchet distance is taken in the features of this
network instead, trained by the project on the same dataset (at least 91 % test accuracy on
FashionMNIST, 99 % on MNIST). Scores are only comparable when taken with the same classifier, so the FashionMNIST
classifier is shipped in the repository and is the default everywhere; fitting your own stays
possible. Where a dataset's classifier is looked for:

    --classifier-dir DIR, else $DDPM_CLASSIFIER_DIR   (your own, when given)
    classifiers/<dataset>.safetensors                 (shipped with the repository)
    data/classifiers/<dataset>.safetensors            (fitted here, git-ignored)

`--fit-classifier` never overwrites the shipped file: it writes into the folder given, else into
data/classifiers/.

Its safetensors metadata holds the dataset, the test accuracy and the architecture version, so a
file written by an older architecture is recognised and refitted instead of loaded into the wrong
shapes. Loading never unpickles anything.

Network (about 0.47 M parameters, about 5 M multiply-adds per image, so a CPU fits it in minutes):
    uint8 (B, 28, 28) -> x/127.5 - 1 -> pixel-unshuffle to (B, 4, 14, 14)
    -> [Conv3x3-BN-ReLU] 4->32, 32->32 -> max-pool -> (B, 32, 7, 7)
    -> [Conv3x3-BN-ReLU] 32->64, 64->64 -> (B, 64, 7, 7)
    -> flatten -> Linear 3136->128 -> BN -> ReLU   = the 128-d features
    -> Linear 128->10                              = class logits
The pixel-unshuffle (space-to-depth) start halves the resolution without discarding pixels: the
28x28 layers were what made the first drafts too slow to fit on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn
from torch.nn import functional as F

from ..config import DATASET_NAMES, ConfigError
from ..data.datasets import CLASS_NAMES, ImageSet
from ..errors import RunError
from ..store.cache import DIGEST_KEY, tensors_digest
from ..store.io import atomic_write_bytes, read_bounded_bytes, safetensors_metadata

ARCH_VERSION = 1          # bump when the network changes: older files are then refitted
FEATURE_DIM = 128
NUM_CLASSES = 10
ENV_CLASSIFIER_DIR = "DDPM_CLASSIFIER_DIR"
DEFAULT_CLASSIFIER_DIR = Path("data") / "classifiers"
SHIPPED_CLASSIFIER_DIR = Path(__file__).resolve().parents[2] / "classifiers"
MAX_CLASSIFIER_BYTES = 64 << 20  # the network is ~1.3 MB of float32 weights
# What `fit` must reach on the test split; a fit below it is still saved, with a warning.
REQUIRED_ACCURACY = {"fashion_mnist": 0.91, "mnist": 0.99}

ProgressFn = Callable[[int, int, float], None]  # (steps done, steps total, last loss)


class ClassifierError(RuntimeError):
    """A classifier file is missing, damaged or from another architecture; the message says what to run."""


class ClassifierNotFoundError(ClassifierError):
    """No classifier has been fitted for this dataset yet."""


def fit_command(dataset: str) -> str:
    return f"python -m core eval --fit-classifier --dataset {dataset}"


# -- network -----------------------------------------------------------------------------------------
def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FeatureClassifier(nn.Module):
    """The CNN above; `features` gives the 128-d embedding, `forward` the logits."""

    num_features = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.PixelUnshuffle(2),                                   # (B, 4, 14, 14)
            *_conv_bn_relu(4, 32), *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),                                        # (B, 32, 7, 7)
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64),         # (B, 64, 7, 7)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM, bias=False),
                                   nn.BatchNorm1d(FEATURE_DIM), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 28, 28) or (B, 1, 28, 28) -> float (B, 1, 28, 28) in [-1, 1]."""
        if images.dtype != torch.uint8:
            raise ConfigError(f"images dtype = {images.dtype} is not allowed: the classifier reads uint8 pixels")
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
            raise ConfigError(f"images shape = {tuple(images.shape)} is not allowed: expected (N, 28, 28)")
        return images.float() / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(self.prepare(images)))  # (B, 128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, 10)


class FeatureExtractor(nn.Module):
    """uint8 images -> 128-d features, the `feature` module torchmetrics' FID expects.

    torchmetrics calls `module(imgs)` and reads `num_features`; it leaves custom modules in
    whatever mode they are in, so this one pins the classifier to eval mode (BatchNorm running
    statistics, never batch statistics: a feature must not depend on its batch-mates).
    """

    def __init__(self, classifier: FeatureClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = FEATURE_DIM

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)

    @torch.no_grad()  # not inference_mode: torchmetrics adds these into its own (normal) state tensors
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images).float()


# -- fitting -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitConfig:
    """How the classifier is trained: AdamW with a one-cycle learning rate, batches drawn by index.

    Five epochs because three left test accuracy measurably lower; no augmentation, because random
    flips cost accuracy: in a few epochs this network underfits, it does not overfit.
    """
    epochs: int = 5
    batch_size: int = 128
    lr: float = 4e-3            # peak of the one-cycle schedule
    weight_decay: float = 0.05  # decoupled (AdamW)
    max_steps: int = 0          # 0: run all epochs (tests use a handful of steps)
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("max_steps", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} = {value!r} is not allowed: it must be a whole number >= {low}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ConfigError(f"{name} = {value!r} is not allowed: it must be a finite number "
                                  f"{'> 0' if name == 'lr' else '>= 0'}")


@dataclass
class Classifier:
    """A fitted (or loaded) classifier with what is known about it."""
    model: FeatureClassifier
    dataset: str
    test_accuracy: float
    arch_version: int = ARCH_VERSION
    path: Path | None = None
    sha256: str = ""            # of the weights file: names the classifier in caches and eval entries
    fit_seconds: float = 0.0
    note: str | None = None     # a fallback taken while loading it, for the caller to say out loud

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[self.dataset]


@torch.inference_mode()
def accuracy(model: FeatureClassifier, data: ImageSet, device: torch.device | str = "cpu",
             batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(data.images[start:start + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == data.labels[start:start + batch_size]).sum())
    return correct / max(1, len(data))


def fit(train: ImageSet, test: ImageSet, config: FitConfig = FitConfig(), device: torch.device | str = "cpu",
        progress: ProgressFn | None = None) -> Classifier:
    """Train a FeatureClassifier on `train` and measure its accuracy on `test`."""
    if train.dataset != test.dataset:
        raise ConfigError(f"test dataset = {test.dataset!r} is not allowed: the training split is {train.dataset!r}")
    device = torch.device(device)
    torch.manual_seed(config.seed)  # the initial weights
    gen = torch.Generator().manual_seed(config.seed)
    # channels_last: faster for these small convolutions on a CPU.
    model = FeatureClassifier().to(device, memory_format=torch.channels_last)
    n = len(train)
    steps_per_epoch = max(1, n // config.batch_size)  # full batches only: BatchNorm dislikes a batch of 1
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    images, labels = train.images.to(device), train.labels.to(device)
    started = time.perf_counter()
    step = 0
    model.train()
    while step < total:
        order = torch.randperm(n, generator=gen).to(device)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            index = order[b * config.batch_size:(b + 1) * config.batch_size]
            x = images[index]                               # uint8 (B, 28, 28), drawn by index
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if progress is not None:
                progress(step, total, loss.item())
    seconds = time.perf_counter() - started
    model.eval()
    return Classifier(model=model, dataset=train.dataset, test_accuracy=accuracy(model, test, device),
                      fit_seconds=seconds)


# -- files -------------------------------------------------------------------------------------------
def classifier_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where a fitted classifier is written: the folder given, else $DDPM_CLASSIFIER_DIR, else data/classifiers."""
    if directory:
        return Path(directory)
    return Path(os.environ.get(ENV_CLASSIFIER_DIR) or DEFAULT_CLASSIFIER_DIR)


def classifier_path(dataset: str, directory: str | os.PathLike | None = None) -> Path:
    """The classifier to score `dataset` with: the one in the folder given (or $DDPM_CLASSIFIER_DIR),
    else the shipped one, else the one fitted here."""
    if dataset not in DATASET_NAMES:
        raise ConfigError(f"dataset = {dataset!r} is not allowed: choose one of {', '.join(DATASET_NAMES)}")
    name = f"{dataset}.safetensors"
    if directory or os.environ.get(ENV_CLASSIFIER_DIR):
        return classifier_dir(directory) / name
    shipped = SHIPPED_CLASSIFIER_DIR / name
    return shipped if shipped.is_file() else DEFAULT_CLASSIFIER_DIR / name


def fit_path(dataset: str, directory: str | os.PathLike | None = None) -> Path:
    """Where `--fit-classifier` writes: never over the shipped classifier."""
    classifier_path(dataset, directory)  # checks the dataset name
    return classifier_dir(directory) / f"{dataset}.safetensors"


def save_classifier(classifier: Classifier, path: Path) -> Classifier:
    """Write the weights atomically with their metadata; returns the classifier with path and sha256."""

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in classifier.model.state_dict().items()}
    metadata = {
        "format": "ddpm-workbench-classifier", "dataset": classifier.dataset,
        "test_accuracy": f"{classifier.test_accuracy:.6f}", "arch_version": str(ARCH_VERSION),
        "feature_dim": str(FEATURE_DIM), "class_names": json.dumps(list(classifier.class_names)),
        "fit_seconds": f"{classifier.fit_seconds:.1f}", "torch": torch.__version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    metadata[DIGEST_KEY] = tensors_digest(state)  # its manifest: a flipped bit is refused at load, like a checkpoint
    blob = save(state, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    classifier.path, classifier.sha256 = path, hashlib.sha256(blob).hexdigest()
    return classifier


def load_classifier(dataset: str, directory: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu") -> Classifier:
    """Load the dataset's classifier; ClassifierNotFoundError / ClassifierError say how to (re)fit it.

    When the shipped classifier is damaged and one was fitted here before (by `eval`, after it
    failed to load), that one is used, and `Classifier.note` says so for the caller to print: a
    damaged shipped file must not make every evaluation refit (minutes) a classifier it then ignores."""
    path = classifier_path(dataset, directory)
    try:
        return _load_classifier_file(path, dataset, device)
    except ClassifierError as exc:
        fitted = DEFAULT_CLASSIFIER_DIR / f"{dataset}.safetensors"
        if path == fitted or directory or os.environ.get(ENV_CLASSIFIER_DIR) or not fitted.is_file():
            raise
        reason = str(exc).split(";")[0]
    classifier = _load_classifier_file(fitted, dataset, device)
    classifier.note = f"{reason}; scoring with the classifier fitted here instead ({fitted})"
    return classifier


def _load_classifier_file(path: Path, dataset: str, device: torch.device | str) -> Classifier:
    refit = f"fit a new one with `{fit_command(dataset)}`"
    try:
        blob = read_bounded_bytes(path, MAX_CLASSIFIER_BYTES, "classifier")
    except RunError as exc:
        if str(exc).endswith(" is missing"):
            raise ClassifierNotFoundError(f"no classifier for {dataset} at {path}; {refit} "
                                          f"(a few minutes on a CPU, once)") from None
        reason = str(exc).removeprefix("run 'classifier': ")
        raise ClassifierError(f"classifier {path} is unusable ({reason}); {refit}") from None
    try:
        state = load(blob)
        metadata = safetensors_metadata(blob)
    except (SafetensorError, ValueError, OSError) as exc:
        raise ClassifierError(f"classifier {path} is damaged ({str(exc)[:160]}); {refit}") from None
    version = metadata.get("arch_version")
    if metadata.get("dataset") != dataset:
        raise ClassifierError(f"classifier {path} was fitted on {str(metadata.get('dataset'))[:40]!r}, not "
                              f"{dataset!r}; {refit}")
    if version != str(ARCH_VERSION):
        raise ClassifierError(f"classifier {path} has architecture version {str(version)[:20]}, this code needs "
                              f"{ARCH_VERSION}; {refit}")
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise ClassifierError(f"classifier {path} is damaged (non-finite weights); {refit}")
    # Classifiers fitted since issue 23 carry the sha256 of their weights (the shipped one predates it).
    if DIGEST_KEY in metadata and metadata[DIGEST_KEY] != tensors_digest(state):
        raise ClassifierError(f"classifier {path} is damaged (its weights do not match the sha256 in its "
                              f"metadata); {refit}")
    model = FeatureClassifier()
    try:
        model.load_state_dict(state, strict=True)
        test_accuracy = float(metadata["test_accuracy"])
        fit_seconds = float(metadata.get("fit_seconds", 0) or 0)
        if not (0.0 <= test_accuracy <= 1.0 and 0.0 <= fit_seconds < 1e9):
            raise ValueError("test_accuracy or fit_seconds out of range")
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise ClassifierError(f"classifier {path} does not fit the network ({first}); {refit}") from None
    return Classifier(model=model.to(device, memory_format=torch.channels_last).eval(), dataset=dataset, test_accuracy=test_accuracy,
                      path=path, sha256=hashlib.sha256(blob).hexdigest(), fit_seconds=fit_seconds)


read_metadata = safetensors_metadata  # the __metadata__ of a safetensors blob (the one checked parser in store.io)
