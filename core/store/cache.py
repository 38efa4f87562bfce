"""Cached derived data (the classifier's test statistics, and any cache to come), verified like a
checkpoint before a number of it is used.

A cache is a safetensors file whose metadata is its manifest: what it was computed from (the
caller's key, e.g. the sha256 of the classifier and of the test split) and the sha256 of its own
tensors. A cache is only a shortcut, so any doubt means "recompute": a file that is missing, not a
regular file, oversized, torn, computed from something else, altered after it was written (one
flipped exponent bit turned a Fréchet distance of 70 into 0.0) or holding a non-finite value is
reported as a reason and never read further. Writes go through `atomic_write_bytes`, never through a
link.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save

from ..errors import RunError
from .io import MAX_TENSOR_BYTES, atomic_write_bytes, parse_safetensors, read_bounded_bytes, safetensors_metadata

DIGEST_KEY = "tensors_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def save_cache(path: Path, tensors: dict[str, torch.Tensor], key: dict[str, str]) -> None:
    """Write a cache with its manifest (the key and the tensors' sha256); refuses non-finite data."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    if not all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point()):
        raise ValueError("a cache must hold finite numbers only")
    atomic_write_bytes(path, save(tensors, metadata={**key, DIGEST_KEY: tensors_digest(tensors)}))


def load_cache(path: Path, key: dict[str, str], max_bytes: int = MAX_TENSOR_BYTES) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(tensors, "") when the cache at `path` is intact, finite and computed from `key`; else
    (None, why it must be recomputed)."""
    try:
        blob = read_bounded_bytes(path, max_bytes, path.name, missing_ok=True)
        if blob is None:
            return None, "missing"
        meta = safetensors_metadata(blob)
        tensors = parse_safetensors(blob, path.name, path.name)
    except (RunError, ValueError) as exc:
        return None, f"unreadable ({' '.join(str(exc).split())[:160]})"
    if any(meta.get(k) != v for k, v in key.items()):
        return None, "computed from another classifier or data"
    if meta.get(DIGEST_KEY) != tensors_digest(tensors):
        return None, "damaged (its numbers do not match the sha256 in its manifest)"
    if not all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point()):
        return None, "damaged (it holds non-finite numbers)"
    return tensors, ""
