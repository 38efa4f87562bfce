"""The built-in datasets (FashionMNIST, MNIST, CIFAR-10) as one uint8 (N, C, H, W) tensor, via torchvision.

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

from ..config import BUILTIN_CLASS_NAMES, BUILTIN_DATASETS, DATASET_LABELS, ConfigError

# (C, H, W) of the book's data and of every format 1-4 run; other runs carry theirs in `config.data.shape`.
IMAGE_SHAPE = (1, 28, 28)
ENV_DATA_ROOT = "DDPM_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("data")
DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
CLASS_NAMES = BUILTIN_CLASS_NAMES


class DatasetNotFoundError(RuntimeError):
    """No copy of the dataset could be found or fetched; the message lists each place tried."""


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,).

    `class_names` are the built-in dataset's or the folder's subfolders; an unlabelled folder has none
    and labels of -1, so a conditional run on it fails loudly instead of learning one fake class.
    """
    images: torch.Tensor
    labels: torch.Tensor
    dataset: str
    split: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.class_names and self.dataset in CLASS_NAMES:
            object.__setattr__(self, "class_names", CLASS_NAMES[self.dataset])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(int(d) for d in self.images.shape[1:])  # type: ignore[return-value]

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)


def _torchvision_class(dataset: str):
    return {"fashion_mnist": datasets.FashionMNIST, "mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[dataset]


def _folder_name(dataset: str) -> str:
    # torchvision's folder names: the datasets' own names, and CIFAR-10's unpacked archive
    return "cifar-10-batches-py" if dataset == "cifar10" else DATASET_LABELS[dataset]


def _raw_dir(root: Path, dataset: str) -> Path:
    return root / _folder_name(dataset) if dataset == "cifar10" else root / _folder_name(dataset) / "raw"


def _has_raw_files(root: Path, dataset: str) -> bool:
    names = CIFAR_FILES if dataset == "cifar10" else RAW_FILES
    return all((_raw_dir(root, dataset) / name).is_file() for name in names)


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
    if dataset not in BUILTIN_DATASETS:
        raise ConfigError(f"dataset = {dataset!r} is not allowed: choose one of {', '.join(BUILTIN_DATASETS)} "
                          "(an image folder is read by core.data.folder)")
    roots = candidate_roots(data_root)
    tried = []
    for root in roots:
        if _has_raw_files(root, dataset):
            return root
        tried.append(f"{_raw_dir(root, dataset)} (no {'CIFAR batch' if dataset == 'cifar10' else 'IDX'} files)")
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
           "unpack cifar-10-python.tar.gz into DIR (DIR/cifar-10-batches-py/) and pass --data-root DIR"
           if dataset == "cifar10" else
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
    if dataset == "cifar10":   # numpy (N, 32, 32, 3) and a list of labels
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    else:                      # uint8 (N, 28, 28)
        images = ds.data.to(torch.uint8).unsqueeze(1)
        labels = ds.targets.to(torch.int64)
    return ImageSet(images=images.contiguous(), labels=labels.contiguous(), dataset=dataset, split=split)


def to_model_range(images_uint8: torch.Tensor, pixel_range: str) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, C, H, W) in [0, 1] (book) or [-1, 1]."""
    x = images_uint8.float() / 255.0
    return x if pixel_range == "unit" else x * 2.0 - 1.0


def to_uint8(x: torch.Tensor, pixel_range: str) -> torch.Tensor:
    """Model-range float (B, C, H, W) -> uint8 (B, C, H, W); the book's x*255 clamped to [0, 255]."""
    if pixel_range == "symmetric":
        x = (x + 1.0) / 2.0
    return (x * 255.0).clamp(0, 255).round().to(torch.uint8)


def data_range(pixel_range: str) -> tuple[float, float]:
    """The interval clean images occupy in model space: [0, 1] (the book) or [-1, 1]."""
    return (0.0, 1.0) if pixel_range == "unit" else (-1.0, 1.0)
