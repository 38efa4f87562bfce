"""Crash-safe file writes, bounded reads of possibly hostile files, and safetensors weights and
optimizer state.

Every file the workbench writes goes through `atomic_write_bytes` (a fresh temporary file in the
same folder, fsync, then rename), so a crash leaves the previous version, never half a file.

A run folder may come from someone else, so every read of one of its files goes through
`read_bounded_bytes`: it never follows a symbolic link, reads regular files only (a FIFO would
hang the reader, /dev/zero would fill the memory), refuses a file over its size limit before
reading it, and turns every failure into a `RunError` that names the run and the file.
Weights and optimizer state are safetensors: loading them never unpickles anything.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from .. import safejson
from ..errors import RunError

# Size limits, checked before a byte is read. The JSON files of a run are a few KB; 1 MiB leaves
# a wide margin. metrics.csv grows by ~60 bytes a row: 64 MiB is a million rows.
MAX_JSON_BYTES = 1 << 20
MAX_EVAL_BYTES = 8 << 20
MAX_METRICS_BYTES = 64 << 20
MAX_IMAGE_BYTES = 32 << 20
# budget.MAX_PARAMETERS (5e8) float32 weights are 2 GB, Adam's two moments 4 GB: 5 GiB bounds any
# tensor file of a run the workbench can train or load.
MAX_TENSOR_BYTES = 5 << 30
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# -- writing -----------------------------------------------------------------------------------------
def temp_path(path: Path) -> Path:
    """The temporary name `atomic_write_bytes` uses for `path` (the pid tells whose it is)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class UnsafeFolder(RunError):
    """A folder on the way to a write is a link, or not a folder: nothing is written through it."""


def open_folder(folder: str | os.PathLike, inside: str | os.PathLike | None = None) -> int:
    """A file descriptor of `folder`, opened without following a link at any step below `inside`
    (by default, at `folder`'s own name only). Every write and lock of the workbench is made relative
    to such a descriptor, so a run folder, `sweeps/` or a sweep's folder replaced by a link to a
    folder elsewhere is refused instead of written through."""
    folder = Path(os.path.abspath(folder))
    base = Path(os.path.abspath(inside)) if inside is not None else folder.parent
    try:
        parts = folder.relative_to(base).parts
    except ValueError:
        raise UnsafeFolder(f"{folder} is not inside {base}; nothing is written outside it") from None
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise UnsafeFolder(f"{base / part} is a symbolic link or not a folder; nothing is written "
                                   "through it: move it away, then try again") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_new_file(path: Path, data: bytes, dir_fd: int | None = None) -> None:
    """Write `data` to a file that must not exist yet, and fsync it.

    O_EXCL | O_NOFOLLOW: a name planted in a shared run folder (a symlink to a file elsewhere)
    is never followed and written through.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, inside: str | os.PathLike | None = None) -> None:
    """Replace `path` by `data` atomically, relative to its folder opened by `open_folder` (checked
    for links from `inside` down). A folder in the file's place is refused in one line."""
    path = Path(path)
    name, tmp = path.name, temp_path(path).name
    folder = open_folder(path.parent, inside)
    try:
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
                raise UnsafeFolder(f"{path} is a folder where a file belongs; move it away, then try again")
        except FileNotFoundError:
            pass
        try:
            os.unlink(tmp, dir_fd=folder)  # a leftover of a killed process with our pid
        except FileNotFoundError:
            pass
        try:
            write_new_file(Path(tmp), data, dir_fd=folder)
            os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            try:  # a full disk or a kill mid-write leaves no temp file behind
                os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
            raise
    finally:
        os.close(folder)


def atomic_write_text(path: Path, text: str, inside: str | os.PathLike | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), inside)


def overwrite_in_place(path: Path, data: bytes) -> None:
    """Rewrite a small existing file where it is: on a full disk there is no room for the
    temporary copy an atomic write needs, but a few hundred bytes fit in the file's own block."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.write(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Make renames inside `folder` durable (a power cut must not undo a checkpoint's pointer)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


# -- bounded reading ---------------------------------------------------------------------------------
def _open_regular(path: Path, max_bytes: int, run: str) -> tuple[int, int]:
    """(fd, size) of a regular file no larger than `max_bytes`; anything else is a RunError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunError(f"run {run!r}: {path.name} is a symbolic link; run files are read only as "
                           "regular files inside the run folder") from None
        raise RunError(f"run {run!r}: {path.name} cannot be read ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RunError(f"run {run!r}: {path.name} is not a regular file (a folder, pipe or device)")
        if info.st_size > max_bytes:
            raise RunError(f"run {run!r}: {path.name} holds {info.st_size:,} bytes, over the "
                           f"{max_bytes:,} such a file may hold")
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def read_bounded_bytes(path: str | os.PathLike, max_bytes: int, run: str, *, missing_ok: bool = False) -> bytes | None:
    """The bytes of a regular file of a run, at most `max_bytes` of them (None if missing and
    `missing_ok`). A file that grows while it is read is cut at the limit and refused."""
    path = Path(path)
    try:
        fd, size = _open_regular(path, max_bytes, run)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise RunError(f"run {run!r}: {path.name} is missing") from None
    try:
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise RunError(f"run {run!r}: {path.name} grew past the {max_bytes:,} bytes such a file may hold")
        return b"".join(chunks)
    except OSError as exc:
        raise RunError(f"run {run!r}: {path.name} cannot be read ({exc.strerror})") from None
    finally:
        os.close(fd)


def parse_json(data: bytes, name: str, run: str) -> Any:
    """JSON from a run file through the one number-checking reader (`core.safejson`): finite
    numbers, integers bounded, and depth or size attacks become a RunError."""
    try:
        return safejson.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RunError(f"run {run!r}: {name} is not text") from None
    except safejson.JSONNestingError:
        raise RunError(f"run {run!r}: {name} is nested too deeply to be a run file") from None
    except ValueError as exc:  # JSONDecodeError, a number out of range
        raise RunError(f"run {run!r}: {name} is not valid JSON ({safejson.describe(exc)})") from None


def read_json_file(path: str | os.PathLike, max_bytes: int, run: str, *, missing_ok: bool = False) -> Any:
    """A run's JSON file, bounded and checked (see `read_bounded_bytes`, `parse_json`); None if
    missing and `missing_ok`."""
    path = Path(path)
    data = read_bounded_bytes(path, max_bytes, run, missing_ok=missing_ok)
    return None if data is None else parse_json(data, path.name, run)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- weights -----------------------------------------------------------------------------------------
def _tensors_for_save(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.clone()  # safetensors refuses tensors that share storage
    return out


def weights_bytes(model: nn.Module, metadata: dict[str, Any] | None = None,
                  dtype: torch.dtype | None = None) -> bytes:
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return save(_tensors_for_save(model.state_dict(), dtype), metadata=meta)


def save_weights(path: Path, model: nn.Module, metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> None:
    atomic_write_bytes(path, weights_bytes(model, metadata, dtype))


def read_tensor_file(path: Path, run: str) -> bytes:
    try:
        return read_bounded_bytes(path, MAX_TENSOR_BYTES, run)
    except RunError as exc:
        if str(exc).endswith(" is missing"):
            raise RunError(f"{exc} (the run has no checkpoint yet)") from None
        raise


def parse_safetensors(data: bytes, name: str, run: str) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise RunError(f"run {run!r}: {name} is damaged or truncated ({exc}); resume from an "
                       "intact copy or delete the run") from None


def read_safetensors(path: Path, run: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    return parse_safetensors(read_tensor_file(path, run), path.name, run)


def load_weights_bytes(data: bytes, name: str, model: nn.Module, run: str) -> None:
    """Load safetensors `data` (the file `name`) into `model`; refuses a shape mismatch and
    non-finite weights (a diverged run), each as one line."""
    state = parse_safetensors(data, name, run)
    reference = model.state_dict()
    if not all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()):
        raise RunError(f"run {run!r}: {name} holds non-finite weights (NaN or inf): the run diverged "
                       "before it was saved; train it again with a lower learning rate")
    try:
        state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]  # one line, past torch's bare "Error(s) in loading" header
        raise RunError(f"run {run!r}: {name} does not fit the model in config.json ({first})") from None


def load_weights(path: Path, model: nn.Module, run: str) -> None:
    path = Path(path)
    load_weights_bytes(read_tensor_file(path, run), path.name, model, run)


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of safetensors bytes: an 8-byte little-endian header length, then JSON."""
    if len(data) < 8:
        raise ValueError("file is shorter than its header")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ValueError("header length is past the end of the file")
    header = safejson.loads(data[8:8 + size].decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ must map names to strings")
    return dict(meta or {})


def weights_metadata(path: Path, run: str | None = None) -> dict[str, str]:
    path = Path(path)
    run = run or path.parent.name
    data = read_tensor_file(path, run)
    try:
        return safetensors_metadata(data)
    except (ValueError, RecursionError) as exc:
        raise RunError(f"run {run!r}: {path.name} is damaged or truncated ({exc})") from None


# -- optimizer state ---------------------------------------------------------------------------------
def optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
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
    return save(tensors, metadata=meta)


def save_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    atomic_write_bytes(path, optimizer_bytes(optimizer))


def _check_optimizer_state(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]],
                           state: dict[int, dict[str, Any]]) -> None:
    """Refuse saved state that torch would accept and then fail on at the first step: a group
    without one of this optimizer's settings, a setting of the wrong kind, a moment whose shape is
    not its parameter's, a step count that is not a number."""
    current = optimizer.param_groups
    if len(groups) != len(current):
        raise ValueError(f"{len(groups)} parameter groups saved, {len(current)} expected")
    params = [p for group in current for p in group["params"]]
    for saved, now in zip(groups, current):
        for key, value in now.items():
            if key == "params":
                continue
            if key not in saved:
                raise ValueError(f"a parameter group misses {key!r}")
            kept = saved[key]
            if isinstance(value, bool) or value is None:
                ok = kept is None or isinstance(kept, bool) if value is None else isinstance(kept, bool)
            elif isinstance(value, (int, float)):
                ok = isinstance(kept, (int, float)) and not isinstance(kept, bool) and math.isfinite(kept)
            elif isinstance(value, tuple):
                ok = isinstance(kept, (list, tuple)) and len(kept) == len(value) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in kept)
            else:
                ok = type(kept) is type(value) or kept is None
            if not ok:
                raise ValueError(f"the group setting {key!r} = {str(kept)[:40]} is not a {type(value).__name__}")
    for index, entry in state.items():
        if not 0 <= index < len(params):
            raise ValueError(f"state for parameter {index}, but there are {len(params)}")
        for key, value in entry.items():
            if key == "step":
                if not (torch.is_tensor(value) and value.numel() == 1) and not (
                        isinstance(value, (int, float)) and not isinstance(value, bool)):
                    raise ValueError(f"the step count of parameter {index} is not a number")
            elif not torch.is_tensor(value) or value.shape != params[index].shape:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"{index}.{key} has shape {shape}, its parameter {tuple(params[index].shape)}")


def load_optimizer_bytes(data: bytes, name: str, optimizer: torch.optim.Optimizer, run: str) -> None:
    try:
        meta = safetensors_metadata(data)
        tensors = parse_safetensors(data, name, run)
        groups = safejson.loads(meta["param_groups"])
        scalars = safejson.loads(meta.get("scalars", "{}"))
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups) \
                or not isinstance(scalars, dict):
            raise ValueError("param_groups must be a list of objects and scalars an object")
        for group in groups:  # JSON has no tuples: give Adam back the (beta1, beta2) pair it was saved with
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        state: dict[int, dict[str, Any]] = {}
        for key, value in list(tensors.items()) + list(scalars.items()):
            index, entry = key.split(".", 1)
            state.setdefault(int(index), {})[entry] = value
    except RunError:
        raise
    except (KeyError, ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise RunError(f"run {run!r}: {name} is damaged ({exc}); delete it to restart the "
                       "optimizer from scratch") from None
    try:
        _check_optimizer_state(optimizer, groups, state)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise RunError(f"run {run!r}: {name} does not fit this optimizer ({reason})") from None


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer, run: str) -> None:
    path = Path(path)
    load_optimizer_bytes(read_tensor_file(path, run), path.name, optimizer, run)
