"""The decoded cache: a folder's images as uint8 (N, C, S, S) on disk, so the second run starts in seconds.

One entry per (folder fingerprint, image size): `<cache>/<key>/` holding images.npy, labels.npy and
manifest.json, which records the shapes and the sha256 of both arrays. An entry is read with bounded
reads and checked against its manifest before use; a damaged, truncated, planted or foreign entry is
ignored and rebuilt, never trusted. Entries are written to a temporary folder and renamed into place,
so a killed writer leaves no half entry under the real name. The channel count is the folder's own
(3 when any image has colour); the run's channels are applied when loading (core.data.folder).

Where: $DDPM_CACHE_DIR, else data/cache/ (beside the built-in datasets).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ENV_CACHE_DIR = "DDPM_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("data") / "cache"
CACHE_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
MAX_ARRAY_BYTES = 4 << 30   # 1M images of 64x64x3 are 12 GB: refuse far earlier than a torn file would matter


@dataclass(frozen=True)
class DecodedFolder:
    images: torch.Tensor                       # uint8 (N, C, S, S), C the folder's own: 1 or 3
    labels: torch.Tensor                       # int64 (N,), -1 when unlabelled
    colour: bool
    skipped: list[str] = field(default_factory=list)   # unreadable files with their reason
    size_counts: dict[str, int] = field(default_factory=dict)  # original "WxH" -> count
    from_cache: bool = False


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR)


def entry_key(fingerprint: str, size: int) -> str:
    return hashlib.sha256(f"{fingerprint}:{size}:v{CACHE_VERSION}".encode()).hexdigest()[:32]


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes (no symlink followed), or None when it is anything else or too large."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        # read what fstat promised (+1 to see a file that grew): never a limit-sized buffer
        data = fh.read(st.st_size + 1)
    return data if len(data) <= limit else None


def _array(data: bytes | None, sha256: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if data is None or hashlib.sha256(data).hexdigest() != sha256:
        return None
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    return array if array.dtype == np.dtype(dtype) and array.shape == shape else None


def load_cached(fingerprint: str, size: int, cache_dir: str | os.PathLike | None = None) -> DecodedFolder | None:
    """The verified entry for this folder state and size, or None (absent or damaged: decode again)."""
    entry = cache_root(cache_dir) / entry_key(fingerprint, size)
    raw = _read_bounded(entry / "manifest.json", MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw) if raw is not None else None
        if not isinstance(manifest, dict) or manifest.get("version") != CACHE_VERSION \
                or manifest.get("fingerprint") != fingerprint or manifest.get("size") != size:
            return None
        shape = tuple(int(d) for d in manifest["shape"])
        if len(shape) != 4 or shape[1] not in (1, 3) or shape[2:] != (size, size):
            return None
        images = _array(_read_bounded(entry / "images.npy", MAX_ARRAY_BYTES), manifest["images_sha256"], "uint8", shape)
        labels = _array(_read_bounded(entry / "labels.npy", MAX_ARRAY_BYTES), manifest["labels_sha256"], "int64",
                        (shape[0],))
        if images is None or labels is None:
            return None
        return DecodedFolder(images=torch.from_numpy(images), labels=torch.from_numpy(labels),
                             colour=bool(manifest["colour"]), skipped=[str(s) for s in manifest["skipped"]][:1000],
                             size_counts={str(k): int(v) for k, v in dict(manifest["size_counts"]).items()},
                             from_cache=True)
    except (ValueError, TypeError, KeyError, RecursionError):
        return None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def save_cached(fingerprint: str, size: int, images: torch.Tensor, labels: torch.Tensor, colour: bool,
                skipped: list[str], sizes: list[tuple[int, int]],
                cache_dir: str | os.PathLike | None = None) -> DecodedFolder:
    """Write the entry (best effort: a read-only disk only costs the next run a decode) and return it."""
    counts: dict[str, int] = {}
    for w, h in sizes:
        counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
    counts = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:100])
    decoded = DecodedFolder(images=images, labels=labels, colour=colour, skipped=skipped, size_counts=counts)
    root = cache_root(cache_dir)
    entry = root / entry_key(fingerprint, size)
    image_bytes, label_bytes = _npy_bytes(images.numpy()), _npy_bytes(labels.numpy())
    manifest = {"version": CACHE_VERSION, "fingerprint": fingerprint, "size": size,
                "shape": list(images.shape), "colour": colour, "skipped": skipped[:1000], "size_counts": counts,
                "images_sha256": hashlib.sha256(image_bytes).hexdigest(),
                "labels_sha256": hashlib.sha256(label_bytes).hexdigest()}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        (tmp / "images.npy").write_bytes(image_bytes)
        (tmp / "labels.npy").write_bytes(label_bytes)
        (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        if entry.exists() or entry.is_symlink():   # a damaged entry: replaced whole
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
    return decoded
