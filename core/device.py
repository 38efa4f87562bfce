"""Which device to run on: `auto` picks CUDA, then Apple's MPS, then the CPU.

A small module of its own because sampling, training, evaluation, the bench, the CLI and the
dashboard all need it, and it needs nothing of theirs.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .config import DEVICE_NAMES, ConfigError


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def resolve_device(name: str | torch.device) -> torch.device:
    """auto -> CUDA, then MPS, then CPU; an explicit device that is missing is a ConfigError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in DEVICE_NAMES:
        raise ConfigError(f"device = {name!r} is not allowed: choose one of {', '.join(DEVICE_NAMES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' is not allowed: no CUDA GPU is visible on this machine; "
                          "use auto or cpu")
    if name == "mps" and not _mps_available():
        raise ConfigError("device = 'mps' is not allowed: Apple's MPS backend is not available here; "
                          "use auto or cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); nothing elsewhere, where
    CPU autocast is slower for these small convolutions."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer or a memory reading sees it done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_host_memory() -> int:
    """Bytes a new allocation in host memory may take: MemAvailable, else the free pages, else a very
    large number (unknown: the guards then let the allocator decide)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62
