"""Crash-safe file writes and safetensors reading/writing of weights and optimizer state.

Every file the workbench writes goes through `atomic_write_bytes` (a temporary file in the same
folder, fsync, then rename), so a crash leaves the previous version, never half a file. Weights
and optimizer state are safetensors: loading them never unpickles anything. Readers turn damage
into a `RunError` that names the run and the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save
from torch import nn

from .errors import RunError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill mid-write leaves no temp file behind
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# -- weights -----------------------------------------------------------------------------------------
def _tensors_for_save(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.clone()  # safetensors refuses tensors that share storage
    return out


def save_weights(path: Path, model: nn.Module, metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> None:
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write_bytes(path, save(_tensors_for_save(model.state_dict(), dtype), metadata=meta))


def read_safetensors(path: Path, run: str) -> dict[str, torch.Tensor]:
    try:
        return load(Path(path).read_bytes())
    except FileNotFoundError:
        raise RunError(f"run {run!r}: {Path(path).name} is missing (the run has no checkpoint yet)") from None
    except (SafetensorError, ValueError, OSError) as exc:
        raise RunError(f"run {run!r}: {Path(path).name} is damaged or truncated ({exc}); resume from an "
                       "intact copy or delete the run") from None


def load_weights(path: Path, model: nn.Module, run: str) -> None:
    state = read_safetensors(path, run)
    reference = model.state_dict()
    try:
        state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]  # one line, past torch's bare "Error(s) in loading" header
        raise RunError(f"run {run!r}: {Path(path).name} does not fit the model in config.json ({first})") from None


def weights_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# -- optimizer state ---------------------------------------------------------------------------------
def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state as safetensors: tensors by '<param index>.<key>', the rest as JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, run: str) -> None:
    path = Path(path)
    try:
        meta = weights_metadata(path)
        tensors = read_safetensors(path, run)
        groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta.get("scalars", "{}"))
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups) \
                or not isinstance(scalars, dict):
            raise ValueError("param_groups must be a list of objects and scalars an object")
        for group in groups:  # JSON has no tuples: give Adam back the (beta1, beta2) pair it was saved with
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        state: dict[int, dict[str, Any]] = {}
        for key, value in list(tensors.items()) + list(scalars.items()):
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
    except RunError:
        raise
    except (SafetensorError, KeyError, ValueError, TypeError, OSError) as exc:
        raise RunError(f"run {run!r}: {path.name} is damaged ({exc}); delete it to restart the "
                       "optimizer from scratch") from None
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"run {run!r}: {path.name} does not fit this optimizer ({exc})") from None
