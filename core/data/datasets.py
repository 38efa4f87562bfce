"""FashionMNIST and MNIST as one uint8 tensor, read through torchvision's dataset classes.

The training loop draws batches by index from this tensor on the training device, so no
per-image PIL conversion happens while training (the book's DataLoader + ToTensor does one
per image per epoch).

Where the files are looked for, in order:
  1. an explicit `data_root` (CLI `--data-root`), else the `DDPM_DATA_ROOT` environment variable;
  2. `./data` (what `make` prepares);
  3. Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist`), copied into
     the data root in the layout torchvision expects;
  4. torchvision's own download (needs internet).
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets

from ..config import DATASET_LABELS, DATASET_NAMES, ConfigError

IMAGE_SHAPE = (1, 28, 28)  # (C, H, W): every dataset here is 28x28 grayscale
ENV_DATA_ROOT = "DDPM_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("data")
DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}


class DatasetNotFoundError(RuntimeError):
    """No copy of the dataset could be found or fetched; the message lists each place tried."""


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor
    dataset: str
    split: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES[self.dataset]


def _torchvision_class(dataset: str):
    return {"fashion_mnist": datasets.FashionMNIST, "mnist": datasets.MNIST}[dataset]


def _folder_name(dataset: str) -> str:
    return DATASET_LABELS[dataset]  # torchvision's folder names are the datasets' own names


def _has_raw_files(root: Path, dataset: str) -> bool:
    raw = root / _folder_name(dataset) / "raw"
    return all((raw / name).is_file() for name in RAW_FILES)


def install_from_debian(root: Path, dataset: str) -> bool:
    """Unpack Debian's .gz files into `root` in torchvision's layout. False when not installed."""
    source = DEBIAN_DIRS.get(dataset)
    if source is None or not all((source / f"{n}.gz").is_file() for n in RAW_FILES):
        return False
    raw = root / _folder_name(dataset) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        target = raw / name
        if target.is_file():
            continue
        tmp = raw / f".{name}.tmp"
        with gzip.open(source / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)  # atomic: a killed copy never looks complete
    return True


def candidate_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    roots = []
    if data_root:
        roots.append(Path(data_root))
    elif os.environ.get(ENV_DATA_ROOT):
        roots.append(Path(os.environ[ENV_DATA_ROOT]))
    roots.append(DEFAULT_DATA_ROOT)
    seen, unique = set(), []
    for root in roots:
        key = root.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(root)
    return unique


def ensure_dataset(dataset: str, data_root: str | os.PathLike | None = None,
                   download: bool = True) -> Path:
    """Return a root where torchvision finds `dataset`, preparing it if needed."""
    if dataset not in DATASET_NAMES:
        raise ConfigError(f"dataset = {dataset!r} is not allowed: choose one of {', '.join(DATASET_NAMES)}")
    roots = candidate_roots(data_root)
    tried = []
    for root in roots:
        if _has_raw_files(root, dataset):
            return root
        tried.append(f"{root / _folder_name(dataset) / 'raw'} (no IDX files)")
    target = roots[0]
    debian = DEBIAN_DIRS.get(dataset)
    if debian is not None:
        try:
            if install_from_debian(target, dataset):
                return target
        except OSError as exc:
            tried.append(f"{debian} (could not copy: {exc})")
        else:
            tried.append(f"{debian} (Debian package dataset-fashion-mnist not installed)")
    if download:
        try:
            _torchvision_class(dataset)(str(target), train=True, download=True)
            _torchvision_class(dataset)(str(target), train=False, download=True)
            if _has_raw_files(target, dataset):
                return target
        except Exception as exc:  # noqa: BLE001 - any network failure ends the same way
            reason = " ".join(str(exc).split())[:160]  # one line: the error is printed as one line
            tried.append(f"torchvision download into {target} (failed: {type(exc).__name__}: {reason})")
    fix = ("run `make data` (installs Debian's dataset-fashion-mnist), or pass --data-root DIR "
           "holding FashionMNIST/raw/*-ubyte" if dataset == "fashion_mnist" else
           f"place the four MNIST IDX files in DIR/MNIST/raw/ and pass --data-root DIR (or set "
           f"{ENV_DATA_ROOT}); Debian has no MNIST package and this machine may have no internet")
    raise DatasetNotFoundError(f"{dataset} not found. Tried: " + "; ".join(tried) + f". To fix: {fix}.")


def load_images(dataset: str = "fashion_mnist", split: str = "train",
                data_root: str | os.PathLike | None = None, download: bool = True) -> ImageSet:
    """Load a split as uint8 tensors via torchvision's dataset class (no per-image work)."""
    if split not in ("train", "test"):
        raise ConfigError(f"split = {split!r} is not allowed: choose train or test")
    root = ensure_dataset(dataset, data_root, download)
    ds = _torchvision_class(dataset)(str(root), train=(split == "train"), download=False)
    images = ds.data.to(torch.uint8).contiguous()   # (N, 28, 28)
    labels = ds.targets.to(torch.int64).contiguous()  # (N,)
    return ImageSet(images=images, labels=labels, dataset=dataset, split=split)


def to_model_range(images_uint8: torch.Tensor, pixel_range: str) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1] (book) or [-1, 1]."""
    x = images_uint8.unsqueeze(1).float() / 255.0
    return x if pixel_range == "unit" else x * 2.0 - 1.0


def to_uint8(x: torch.Tensor, pixel_range: str) -> torch.Tensor:
    """Model-range float (B, 1, H, W) -> uint8 (B, H, W); the book's x*255 clamped to [0, 255]."""
    if pixel_range == "symmetric":
        x = (x + 1.0) / 2.0
    return (x * 255.0).clamp(0, 255).round().to(torch.uint8).squeeze(1)


def data_range(pixel_range: str) -> tuple[float, float]:
    """The interval clean images occupy in model space: [0, 1] (the book) or [-1, 1]."""
    return (0.0, 1.0) if pixel_range == "unit" else (-1.0, 1.0)
