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

Network (for 28x28x1 and 10 classes about 0.47 M parameters, about 5 M multiply-adds per image,
so a CPU fits it in minutes), for C channels, size S (16 to 64, a multiple of 4) and K classes:
    uint8 (B, C, S, S) -> x/127.5 - 1 -> pixel-unshuffle to (B, 4C, S/2, S/2)
    -> [Conv3x3-BN-ReLU] 4C->32, 32->32 -> max-pool -> (B, 32, S/4, S/4)
    -> [Conv3x3-BN-ReLU] 32->64, 64->64 -> (B, 64, S/4, S/4)
    -> flatten -> Linear 64(S/4)^2->128 -> BN -> ReLU   = the 128-d features
    -> Linear 128->K                                     = class logits
The pixel-unshuffle (space-to-depth) start halves the resolution without discarding pixels: the
28x28 layers were what made the first drafts too slow to fit on 2 cores. At C = 1, S = 28, K = 10
the layers, their names and their order are the shipped FashionMNIST classifier's, so its file
loads unchanged (its metadata has no shape keys: they default to exactly that).

Data other than the built-in datasets (an image folder) has no shipped classifier: its fitted one
is stored per dataset fingerprint, data/classifiers/<dataset>-<fingerprint>.safetensors, so a
classifier of one folder is never used to score another.
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
from .pixels import as_nchw, image_shape

ARCH_VERSION = 1          # bump when the network changes: older files are then refitted
FEATURE_DIM = 128
NUM_CLASSES = 10
MIN_SIZE, MAX_SIZE = 16, 64     # the sizes the pipeline trains at; two 2x reductions need a multiple of 4
MAX_CLASSES = 1000
MAX_CLASSIFIER_BYTES = 64 * 2**20  # the largest network (64x64x3, 1000 classes) is about 9 MB
MIN_STEPS = 300                 # a small folder still gets enough optimizer steps (FashionMNIST has 2,340)
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


def check_shape(channels: int, size: int, num_classes: int) -> None:
    """One line per shape the network cannot take."""
    if channels not in (1, 3):
        raise ConfigError(f"channels = {channels!r} is not allowed: the classifier reads 1 or 3 channels")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE or size % 4:
        raise ConfigError(f"image size = {size!r} is not allowed: the classifier takes {MIN_SIZE} to "
                          f"{MAX_SIZE} pixels, a multiple of 4 (or 28, the built-in datasets' size)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes = {num_classes!r} is not allowed: fitting a classifier needs 2 to "
                          f"{MAX_CLASSES} classes (an unlabelled folder has no classifier; --nearest still works)")


class FeatureClassifier(nn.Module):
    """The CNN above; `features` gives the 128-d embedding, `forward` the logits."""

    num_features = FEATURE_DIM

    def __init__(self, channels: int = 1, size: int = 28, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        check_shape(channels, size, num_classes)
        self.image_shape = (channels, size, size)
        self.num_classes = num_classes
        quarter = size // 4
        self.body = nn.Sequential(
            nn.PixelUnshuffle(2),                                   # (B, 4C, S/2, S/2)
            *_conv_bn_relu(4 * channels, 32), *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),                                        # (B, 32, S/4, S/4)
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64),         # (B, 64, S/4, S/4)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * quarter * quarter, FEATURE_DIM, bias=False),
                                   nn.BatchNorm1d(FEATURE_DIM), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) or (B, C, H, W) of this network's shape -> float (B, C, H, W) in [-1, 1]."""
        images = as_nchw(images)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ConfigError(f"images shape = {tuple(images.shape)} is not allowed: this classifier reads "
                              f"(N, {', '.join(map(str, self.image_shape))}) images")
        return images.float() / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(self.prepare(images)))  # (B, 128)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, K)


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
    A small folder runs at least `min_steps` steps (more epochs), so a few hundred images still fit.
    """
    epochs: int = 5
    batch_size: int = 128
    lr: float = 4e-3            # peak of the one-cycle schedule
    weight_decay: float = 0.05  # decoupled (AdamW)
    max_steps: int = 0          # 0: run all epochs (tests use a handful of steps)
    seed: int = 0
    min_steps: int = MIN_STEPS

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("max_steps", 0), ("seed", 0), ("min_steps", 0)):
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
    names: tuple[str, ...] = ()  # the class names; empty: the built-in dataset's own
    fingerprint: str = ""        # of the images it was fitted on; empty: a built-in dataset's classifier
    note: str | None = None     # a fallback taken while loading it, for the caller to say out loud

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.names) or CLASS_NAMES[self.dataset]


@torch.inference_mode()
def accuracy(model: FeatureClassifier, data: ImageSet, device: torch.device | str = "cpu",
             batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = model(as_nchw(data.images[start:start + batch_size]).to(device))
        correct += int((logits.argmax(1).cpu() == data.labels[start:start + batch_size]).sum())
    return correct / max(1, len(data))


def fit(train: ImageSet, test: ImageSet, config: FitConfig = FitConfig(), device: torch.device | str = "cpu",
        progress: ProgressFn | None = None, class_names: tuple[str, ...] | None = None,
        fingerprint: str = "") -> Classifier:
    """Train a FeatureClassifier on `train` and measure its accuracy on `test`; the network takes the
    images' own shape and one output per class name (the dataset's own names unless given)."""
    if train.dataset != test.dataset:
        raise ConfigError(f"test dataset = {test.dataset!r} is not allowed: the training split is {train.dataset!r}")
    names = tuple(class_names) if class_names is not None else tuple(train.class_names)
    channels, height, width = image_shape(train.images)
    if height != width:
        raise ConfigError(f"image shape = {height}x{width} is not allowed: the classifier reads square images")
    if image_shape(test.images) != (channels, height, width):
        raise ConfigError(f"test images shape = {tuple(test.images.shape)} is not allowed: the training split's "
                          f"is {tuple(train.images.shape)}")
    if len(train) < 2 or len(test) < 1:
        raise ConfigError(f"images = {len(train)} training, {len(test)} held out is not allowed: fitting "
                          "a classifier needs at least 2 training images and 1 held-out image")
    for split in (train, test):
        if int(split.labels.min()) < 0 or int(split.labels.max()) >= len(names):
            raise ConfigError(f"labels of the {split.split} split run from {int(split.labels.min())} to "
                              f"{int(split.labels.max())}, which is not allowed: there are {len(names)} class names")
    device = torch.device(device)
    torch.manual_seed(config.seed)  # the initial weights
    gen = torch.Generator().manual_seed(config.seed)
    # channels_last: faster for these small convolutions on a CPU.
    model = FeatureClassifier(channels, height, len(names)).to(device, memory_format=torch.channels_last)
    n = len(train)
    steps_per_epoch = max(1, n // config.batch_size)  # full batches only: BatchNorm dislikes a batch of 1
    epochs = max(config.epochs, -(-config.min_steps // steps_per_epoch))
    total = steps_per_epoch * epochs
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
            x = images[index]                               # uint8 (B, [C,] H, W), drawn by index
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
                      fit_seconds=seconds, names=names if class_names is not None else (), fingerprint=fingerprint)


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


def dataset_fingerprint(data: ImageSet, class_names: tuple[str, ...] | None = None) -> str:
    """sha256 (first 16 hex digits) of the pixels, their shape, the labels and the class names: names a
    fitted classifier, so one fitted on other images (another folder, another size) is never used."""
    digest = hashlib.sha256()
    images = as_nchw(data.images).contiguous()
    digest.update(json.dumps([data.dataset, list(images.shape), list(class_names or data.class_names)]).encode())
    digest.update(images.numpy().tobytes())
    digest.update(data.labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint_path(dataset: str, fingerprint: str, directory: str | os.PathLike | None = None) -> Path:
    """Where the classifier fitted on one dataset fingerprint lives (never a shipped file's name)."""
    if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
        raise ConfigError(f"fingerprint = {fingerprint!r} is not allowed: expected hex digits")
    return classifier_dir(directory) / f"{dataset}-{fingerprint}.safetensors"


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
    channels, size, _ = classifier.model.image_shape
    if (channels, size, classifier.model.num_classes) != (1, 28, NUM_CLASSES) or classifier.fingerprint:
        # Only other shapes carry these keys: a 28x28x1 file stays byte-for-byte what it always was.
        metadata.update(channels=str(channels), image_size=str(size),
                        num_classes=str(classifier.model.num_classes), fingerprint=classifier.fingerprint)
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
        return load_classifier_file(path, dataset, device)
    except ClassifierError as exc:
        fitted = DEFAULT_CLASSIFIER_DIR / f"{dataset}.safetensors"
        if path == fitted or directory or os.environ.get(ENV_CLASSIFIER_DIR) or not fitted.is_file():
            raise
        reason = str(exc).split(";")[0]
    classifier = load_classifier_file(fitted, dataset, device)
    classifier.note = f"{reason}; scoring with the classifier fitted here instead ({fitted})"
    return classifier


def load_fingerprinted(dataset: str, fingerprint: str, directory: str | os.PathLike | None = None,
                       device: torch.device | str = "cpu") -> Classifier:
    """The classifier fitted on exactly these images (`dataset_fingerprint`); ClassifierNotFoundError if none."""
    path = fingerprint_path(dataset, fingerprint, directory)
    classifier = load_classifier_file(path, dataset, device, refit="fit one with `python -m core eval --run "
                                      "NAME --fit-classifier`")
    if classifier.fingerprint != fingerprint:
        raise ClassifierError(f"classifier {path} was fitted on other images (fingerprint "
                              f"{classifier.fingerprint[:40] or 'none'}); fit one with `python -m core eval --run NAME "
                              "--fit-classifier`")
    return classifier


def load_classifier_file(path: Path, dataset: str, device: torch.device | str = "cpu",
                         refit: str | None = None) -> Classifier:
    """Load one classifier file, checking its size, dataset, architecture version, shape and numbers."""
    refit = refit or f"fit a new one with `{fit_command(dataset)}`"
    try:
        blob = read_bounded_bytes(path, MAX_CLASSIFIER_BYTES, "classifier")
    except RunError as exc:
        if str(exc).endswith(" is missing"):
            raise ClassifierNotFoundError(f"no classifier for {dataset} at {path}; {refit} "
                                          f"(a few minutes on a CPU, once)") from None
        reason = str(exc).removeprefix("run 'classifier': ")
        raise ClassifierError(f"classifier {path} is unusable ({reason}): a classifier must be a file, "
                              f"not a link: this is not a regular file under {MAX_CLASSIFIER_BYTES >> 20} MB; {refit}") from None
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
    try:
        # Files without shape keys are 28x28x1 with 10 classes: the shipped FashionMNIST classifier.
        shape = {k: int(metadata.get(k, default)) for k, default in
                 (("channels", 1), ("image_size", 28), ("num_classes", NUM_CLASSES))}
        names = tuple(json.loads(metadata["class_names"])) if "class_names" in metadata else ()
        if names and (len(names) != shape["num_classes"] or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"{len(names)} class names for {shape['num_classes']} classes")
        model = FeatureClassifier(shape["channels"], shape["image_size"], shape["num_classes"])
        model.load_state_dict(state, strict=True)
        test_accuracy = float(metadata["test_accuracy"])
        fit_seconds = float(metadata.get("fit_seconds", 0) or 0)
        if not (0.0 <= test_accuracy <= 1.0 and 0.0 <= fit_seconds < 1e9):
            raise ValueError("test_accuracy or fit_seconds out of range")
    except (RuntimeError, KeyError, ValueError, ConfigError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise ClassifierError(f"classifier {path} does not fit the network ({first}); {refit}") from None
    builtin = dataset in CLASS_NAMES and names == tuple(CLASS_NAMES[dataset])
    return Classifier(model=model.to(device, memory_format=torch.channels_last).eval(), dataset=dataset,
                      test_accuracy=test_accuracy, path=path, sha256=hashlib.sha256(blob).hexdigest(),
                      fit_seconds=fit_seconds, names=() if builtin else names,
                      fingerprint=str(metadata.get("fingerprint", ""))[:200])


def read_metadata(blob: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors blob (bounded and checked in store.io)."""
    return safetensors_metadata(blob)
