"""A folder of the user's own images: found, fingerprinted, decoded once, cached.

The ImageFolder convention (torchvision): two or more subfolders holding images are the classes,
named by the subfolders in sorted order; otherwise the folder is unlabelled and every image under
it counts. Images are found recursively by extension (PNG, JPEG, WebP, BMP, GIF's first frame).

What a folder may hold is treated as possibly hostile: symbolic links are followed only to regular
files inside the folder (a link out of it, to a folder, or looping is skipped and counted), hidden
entries are skipped, depth and file count are bounded, each file is decoded with PIL's
decompression-bomb limit as an error, and a file that does not decode is skipped and named. Every
refusal is one `ImageFolderError` line that says what was wrong and what to do; nothing is written
before the images are known to be usable.
"""
from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError, DataConfig
from ..device import available_host_memory
from .cache import DecodedFolder, load_cached, save_cached
from .datasets import ImageSet
from .transforms import resize_crop, to_channels, to_l_or_rgb

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_FILES = 1_000_000
MAX_DEPTH = 32
MAX_FILE_BYTES = 64 << 20          # a 64 px training image needs nothing near this
MIN_IMAGES = 2                     # one picture is not a distribution
SHOW_NAMES = 3                     # how many skipped files a message names


class ImageFolderError(ConfigError):
    """The folder cannot be trained on; the message says why and what to do (CLI: exit 2)."""


@dataclass(frozen=True)
class FolderScan:
    """What is under a folder before any image is decoded."""
    root: Path
    files: tuple[str, ...]             # paths relative to root, sorted, '/'-separated
    labels: tuple[int, ...]            # index into class_names, or -1 when unlabelled
    class_names: tuple[str, ...]
    fingerprint: str                   # sha256 of (path, size, mtime_ns) of every file
    skipped_links: tuple[str, ...] = ()
    ignored: int = 0                   # files that are not images by their extension


@dataclass(frozen=True)
class FolderSummary:
    """What `python -m core data --dataset folder` prints and the Train form shows."""
    count: int
    sizes: dict[str, int]              # "WxH" -> how many, the most common first
    colour: bool
    class_counts: dict[str, int]
    skipped: tuple[str, ...] = field(default=())  # files that would not decode, with the reason

    def lines(self) -> list[str]:
        sizes = ", ".join(f"{k} ({v})" for k, v in list(self.sizes.items())[:5])
        more = f" and {len(self.sizes) - 5} more sizes" if len(self.sizes) > 5 else ""
        out = [f"{self.count} images, {'colour' if self.colour else 'grayscale'}; sizes {sizes}{more}"]
        if self.class_counts:
            out.append(f"{len(self.class_counts)} classes: " +
                       ", ".join(f"{k} ({v})" for k, v in self.class_counts.items()))
        else:
            out.append("unlabelled (no class subfolders)")
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} unreadable: " + "; ".join(self.skipped[:SHOW_NAMES]))
        return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(root: Path) -> tuple[list[tuple[str, os.stat_result]], list[str], int]:
    """Every image file under root (relative path, stat), the skipped links, and the non-images."""
    real_root = os.path.realpath(root)
    found: list[tuple[str, os.stat_result]] = []
    links: list[str] = []
    ignored = 0
    # (folder, depth, its path relative to root + "/"): built as strings, os.path.relpath per file
    # was half of a cached load's time
    stack: list[tuple[str, int, str]] = [(str(root), 0, "")]
    while stack:
        folder, depth, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # unreadable subfolder: its images are simply not found
        for entry in entries:
            if entry.name.startswith("."):
                continue  # .DS_Store, .cache, editors' swap files
            rel = prefix + entry.name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                # Links are followed to regular files inside the folder only: never out of it, never to
                # a folder (that is where loops come from).
                if not (_inside(target, real_root) and os.path.isfile(target)
                        and entry.name.lower().endswith(EXTENSIONS)):
                    links.append(rel)
                    continue
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 < MAX_DEPTH:
                    stack.append((entry.path, depth + 1, rel + "/"))
                continue
            if not entry.name.lower().endswith(EXTENSIONS):
                ignored += 1
                continue
            try:
                st = entry.stat()   # follows an allowed link to its file
            except OSError:
                continue
            if not _is_regular(st):
                ignored += 1
                continue
            found.append((rel, st))
            if len(found) > MAX_FILES:
                raise ImageFolderError(f"data_dir = {str(root)!r} is not allowed: it holds more than {MAX_FILES:,} "
                                       "images; give a smaller folder")
    return found, links, ignored


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def scan_folder(data_dir: str | os.PathLike) -> FolderScan:
    """Find the images and classes under `data_dir`; refuses a missing folder, a file, an empty one."""
    root = Path(data_dir).expanduser()
    what = f"data_dir = {str(data_dir)!r} is not allowed"
    if not root.exists():
        raise ImageFolderError(f"{what}: no such folder; give the folder that holds your images")
    if not root.is_dir():
        raise ImageFolderError(f"{what}: it is a file, not a folder; give the folder that holds it")
    found, links, ignored = _walk(root)
    if not found:
        raise ImageFolderError(f"{what}: no images in it (looked recursively for "
                               f"{', '.join(EXTENSIONS)}); put your pictures there or give another folder")
    if len(found) < MIN_IMAGES:
        raise ImageFolderError(f"{what}: it holds a single image ({found[0][0]}); a model needs many pictures "
                               "to learn from (a few hundred or more)")
    found.sort(key=lambda item: item[0])
    tops = sorted({rel.split("/", 1)[0] for rel, _ in found if "/" in rel})
    labelled = len(tops) >= 2
    if labelled:
        # ImageFolder: files directly in the root are not in any class; they are left out.
        found = [(rel, st) for rel, st in found if "/" in rel]
        index = {name: i for i, name in enumerate(tops)}
        labels = tuple(index[rel.split("/", 1)[0]] for rel, _ in found)
    else:
        labels = tuple(-1 for _ in found)
    digest = hashlib.sha256()
    for rel, st in found:
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return FolderScan(root=root, files=tuple(rel for rel, _ in found), labels=labels,
                      class_names=tuple(tops) if labelled else (), fingerprint=digest.hexdigest(),
                      skipped_links=tuple(links), ignored=ignored)


def open_image(path: Path) -> Image.Image:
    """Decode one file to "L" or "RGB" (GIF: its first frame); PIL's bomb warning is an error here."""
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"over {MAX_FILE_BYTES >> 20} MB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.seek(0)
            image.load()
            return to_l_or_rgb(image)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "over PIL's decompression-bomb limit"
    return " ".join(str(exc).split())[:80] or type(exc).__name__


def _pixels(image: Image.Image) -> np.ndarray:
    """An "L" or "RGB" image as uint8 (C, H, W); an RGB picture of gray pixels becomes one channel."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        return array[None]
    if (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        return array[None, ..., 0]          # saved as RGB, but no colour to keep
    return array.transpose(2, 0, 1)


def _decode_chunk(root: Path, files: tuple[str, ...], labels: tuple[int, ...], size: int):
    """Decode some files into uint8 (n, 3, S, S): the pixels, labels, colour flag, skipped, sizes."""
    out = np.empty((len(files), 3, size, size), np.uint8)
    kept, skipped, sizes = [], [], []
    colour = False
    for rel, label in zip(files, labels):
        try:
            image = open_image(root / rel)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, EOFError) as exc:
            skipped.append(f"{rel} ({_reason(exc)})")
            continue
        sizes.append(image.size)
        pixels = _pixels(image)
        if pixels.shape[1:] != (size, size):
            pixels = resize_crop(torch.from_numpy(pixels.copy())[None], size)[0].numpy()  # PIL's array is read-only
        colour = colour or pixels.shape[0] == 3
        out[len(kept)] = pixels           # one channel broadcasts to three: the gray value in each
        kept.append(label)
    return out[:len(kept)], kept, colour, skipped, sizes


PARALLEL_FROM = 4000   # below this, starting worker processes costs more than it saves


def decode_folder(scan: FolderScan, size: int) -> tuple[torch.Tensor, torch.Tensor, bool, list[str], list[tuple[int, int]]]:
    """Decode every image at `size`: uint8 (N, C, S, S) with C 3 when any image has colour, else 1;
    their labels; the colour flag; the skipped files with reasons; the original sizes.

    PIL's decoding is most of the time, so a large folder is decoded by one process per core, in
    contiguous chunks whose results are joined in the folder's order (the same tensor either way)."""
    workers = min(os.cpu_count() or 1, 8)
    n = len(scan.files)
    if n < PARALLEL_FROM or workers < 2:
        parts = [_decode_chunk(scan.root, scan.files, scan.labels, size)]
    else:
        import concurrent.futures
        import multiprocessing
        bounds = [n * k // workers for k in range(workers + 1)]
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_decode_chunk, [scan.root] * workers,
                                  [scan.files[a:b] for a, b in zip(bounds, bounds[1:])],
                                  [scan.labels[a:b] for a, b in zip(bounds, bounds[1:])], [size] * workers))
    labels = [label for part in parts for label in part[1]]
    skipped = [name for part in parts for name in part[3]]
    sizes = [wh for part in parts for wh in part[4]]
    if not labels:
        raise ImageFolderError(f"data_dir = {str(scan.root)!r} is not allowed: none of its {n} images "
                               f"could be read ({'; '.join(skipped[:SHOW_NAMES])}); check the files")
    colour = any(part[2] for part in parts)
    pixels = np.concatenate([part[0] for part in parts]) if len(parts) > 1 else parts[0][0]
    images = torch.from_numpy(np.ascontiguousarray(pixels if colour else pixels[:, :1]))
    return images, torch.tensor(labels, dtype=torch.int64), colour, skipped, sizes


def summarize(data_dir: str | os.PathLike, size: int = 32) -> FolderSummary:
    """Scan and decode a folder (through the cache) and say what is in it."""
    scan = scan_folder(data_dir)
    decoded = _decoded(scan, size, cache_dir=None)
    class_counts = {name: int((decoded.labels == i).sum()) for i, name in enumerate(scan.class_names)}
    return FolderSummary(count=len(decoded.labels), sizes=decoded.size_counts, colour=decoded.colour,
                         class_counts=class_counts, skipped=tuple(decoded.skipped))


def check_memory(n: int, size: int) -> None:
    """Refuse a folder whose decoded images (at worst 3 channels, held twice while stacking) will not fit."""
    need = 2 * n * 3 * size * size
    have = available_host_memory() // 2   # leave half for the network, the optimizer and everyone else
    if need > have:
        fits = max(0, have // (2 * 3 * size * size))
        raise ImageFolderError(f"image_size = {size} is not allowed for {n:,} images: decoding needs about "
                               f"{need / 1e9:.1f} GB, this machine has {have / 1e9:.1f} GB to spare; use a smaller "
                               f"--image-size or a folder of at most {fits:,} images")


def _decoded(scan: FolderScan, size: int, cache_dir: str | os.PathLike | None) -> DecodedFolder:
    cached = load_cached(scan.fingerprint, size, cache_dir)
    if cached is not None:
        return cached
    check_memory(len(scan.files), size)
    images, labels, colour, skipped, sizes = decode_folder(scan, size)
    return save_cached(scan.fingerprint, size, images, labels, colour, skipped, sizes, cache_dir)


def resolve_data_config(data: DataConfig, channels_given: bool = True,
                        cache_dir: str | os.PathLike | None = None) -> DataConfig:
    """A folder run's data section completed from the folder: fingerprint, class names and, unless the
    user chose, the channels (3 when any image has colour). Refuses what cannot be trained on."""
    if data.dataset != "folder":
        return data
    scan = scan_folder(data.data_dir)
    decoded = _decoded(scan, data.image_size, cache_dir)
    channels = data.channels if channels_given else (3 if decoded.colour else 1)
    return replace(data, data_dir=str(Path(data.data_dir).expanduser().resolve()), fingerprint=scan.fingerprint,
                   class_names=scan.class_names, channels=channels)


def load_folder(data: DataConfig, split: str = "train", *, cache_dir: str | os.PathLike | None = None,
                allow_change: bool = False) -> ImageSet:
    """The folder's images at the run's shape (uint8 (N, C, S, S)), through the decoded cache."""
    if split != "train":
        raise ImageFolderError(f"split = {split!r} is not allowed: an image folder is one training set "
                               "(there is no test split)")
    scan = scan_folder(data.data_dir)
    if data.fingerprint and scan.fingerprint != data.fingerprint and not allow_change:
        raise ImageFolderError(f"data_dir = {data.data_dir!r} is not allowed: the folder changed since the run was "
                               "made (files added, removed or edited); resume with --allow-data-change to train on "
                               "it as it is now, or restore the folder")
    if data.class_names and scan.class_names != data.class_names:
        raise ImageFolderError(f"data_dir = {data.data_dir!r} is not allowed: its classes are now "
                               f"{', '.join(scan.class_names) or 'none'}, the run was made with "
                               f"{', '.join(data.class_names)}; the network's labels would mean other things")
    decoded = _decoded(scan, data.image_size, cache_dir)
    return ImageSet(images=to_channels(decoded.images, data.channels).contiguous(), labels=decoded.labels,
                    dataset="folder", split="train", class_names=scan.class_names)
