"""All-or-nothing checkpoints: every file of one, or the previous complete one; never a mix.

A checkpoint is the tensor files (`model.safetensors`, `ema.safetensors`, `optimizer.safetensors`)
under their usual names in the run folder, plus `checkpoint.json`: the manifest that names its
step, epoch, training time and the sha256 and size of each file. The manifest is written last and
atomically, so it is the switch: files that do not match it are torn (a kill between renames) or
damaged (a flipped byte), and are never loaded. `previous/` holds the checkpoint before, as hard
links (no copy, no extra space until the next one is written), for the loader to fall back to.

Writing checkpoint S+1 over S:
  1. previous/ := S (hard links; its manifest last), only when the run folder holds S complete;
  2. the new files are written under temporary names and fsynced (a full disk fails here, with S
     untouched in both places; the temporary files are removed);
  3. they are renamed over the current names (a kill here leaves a mix: previous/ has S);
  4. checkpoint.json is replaced by the manifest of S+1, then state.json (read by older tools).
Run folders written before manifests existed (the shipped demo runs) have no checkpoint.json:
their files load as before, and a model whose step disagrees with state.json is refused as torn.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from ..errors import RunError
from .io import (MAX_JSON_BYTES, atomic_write_text, fsync_folder, read_json_file, read_tensor_file,
                 safetensors_metadata, sha256_hex, temp_path, write_new_file)

MANIFEST = "checkpoint.json"
PREVIOUS = "previous"
TENSOR_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
MAX_STEP = 10**12  # far beyond any run; bounds what a hostile file can make the loop or the UI do
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")
Picker = Callable[[Path, list], list]  # (folder, file names a checkpoint holds) -> the ones to read


@dataclass
class Checkpoint:
    """One complete checkpoint, its files already read and verified (`blobs`, by file name)."""
    folder: Path
    step: int
    epoch: int = 0
    elapsed_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    fallback: bool = False  # True when the newest checkpoint was torn and this is the one before
    fallback_reason: str = ""  # why the newest was not used: said out loud by every caller

    @property
    def fallback_note(self) -> str | None:
        """The line that says a fallback was taken (stderr, the run's listing, the page); None if none."""
        if not self.fallback:
            return None
        return (f"the newest checkpoint is unusable ({shorten(self.fallback_reason)}); using the previous one "
                f"(step {self.step}) from {PREVIOUS}/")


# -- values ------------------------------------------------------------------------------------------
def whole_number(value: Any, name: str, file: str, run: str, high: int = MAX_STEP) -> int:
    """A step or epoch from a run file: a whole number in 0..high, or a RunError naming it."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise RunError(f"run {run!r}: {file} holds {name} = {str(value)[:40]}; it must be a whole number "
                       f"from 0 to {high}")
    return value


def seconds(value: Any, name: str, file: str, run: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e10:
        raise RunError(f"run {run!r}: {file} holds {name} = {str(value)[:40]}; it must be a number of "
                       "seconds from 0 to 1e10")
    return float(value)


# -- the manifest ------------------------------------------------------------------------------------
def read_manifest(folder: Path, run: str) -> dict[str, Any] | None:
    """The manifest in `folder`, every field checked; None when there is none."""
    data = read_json_file(folder / MANIFEST, MAX_JSON_BYTES, run, missing_ok=True)
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise RunError(f"run {run!r}: {MANIFEST} is not a checkpoint manifest")
    files = {}
    for name, entry in data["files"].items():
        if name not in TENSOR_FILES or not isinstance(entry, dict) or not _SHA256.match(str(entry.get("sha256"))):
            raise RunError(f"run {run!r}: {MANIFEST} lists {str(name)[:40]!r} without a valid sha256")
        files[name] = {"sha256": entry["sha256"], "size": whole_number(entry.get("size"), "size", MANIFEST, run, 1 << 40)}
    if "model.safetensors" not in files:
        raise RunError(f"run {run!r}: {MANIFEST} lists no model.safetensors")
    meta = data.get("meta")
    return {"step": whole_number(data.get("step"), "step", MANIFEST, run),
            "epoch": whole_number(data.get("epoch", 0), "epoch", MANIFEST, run),
            "elapsed_s": seconds(data.get("elapsed_s", 0.0), "elapsed_s", MANIFEST, run),
            "meta": meta if isinstance(meta, dict) else {}, "files": files}


def shorten(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _verified(folder: Path, manifest: dict[str, Any], names: list[str], run: str) -> dict[str, bytes]:
    """The bytes of `names` in `folder`, each matching the manifest's size and sha256, the weights
    finite (NaN planted under a resealed manifest is damage, and previous/ may still be intact)."""
    blobs = {}
    for name in names:
        expected = manifest["files"][name]
        data = read_tensor_file(folder / name, run)
        if len(data) != expected["size"] or sha256_hex(data) != expected["sha256"]:
            raise RunError(f"run {run!r}: {name} is damaged or truncated (its sha256 does not match the "
                           f"step-{manifest['step']} {MANIFEST}); resume from an intact copy or delete the run")
        if name != "optimizer.safetensors" and not finite_weights(data):
            raise RunError(f"run {run!r}: {name} holds non-finite weights (NaN or inf) under a matching "
                           f"{MANIFEST}: the file was altered, or the run diverged before it was saved")
        _VERIFIED[_file_key(folder / name)] = expected["sha256"]
        blobs[name] = data
    return blobs


def finite_weights(data: bytes) -> bool:
    """Whether every floating tensor of safetensors `data` is finite (unparsable data counts as
    finite here: the weights' loader reports it with its own message)."""
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError):
        return True
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


# Files whose sha256 matched their manifest, by (path, inode, size, mtime): listing the runs checks
# the newest checkpoint of each without hashing gigabytes again on every refresh.
_VERIFIED: dict[tuple, str] = {}


def _file_key(path: Path) -> tuple | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (str(path), info.st_ino, info.st_size, info.st_mtime_ns)


def newest_problem(run_dir: Path, run: str) -> str | None:
    """Why the newest checkpoint (the run folder's manifest) cannot be used, or None when it can
    (or the run has none): for the run's listing, which otherwise shows a step it cannot load."""
    try:
        manifest = read_manifest(run_dir, run)
        if manifest is None:
            previous = run_dir / PREVIOUS / MANIFEST
            return f"run {run!r}: {MANIFEST} is missing" if os.path.lexists(previous) else None
        # The weights, as the loaders read them: the optimizer state matters only to a resume, which checks
        # it itself (and the shipped runs come without it, on purpose).
        names = [n for n in manifest["files"] if n != "optimizer.safetensors"
                 and _VERIFIED.get(_file_key(run_dir / n)) != manifest["files"][n]["sha256"]]
        _verified(run_dir, manifest, names, run)
    except RunError as exc:
        return str(exc)
    return None


def _candidates(run_dir: Path, run: str) -> list[tuple[Path, dict[str, Any] | None, RunError | None]]:
    found = []
    for folder in (run_dir, run_dir / PREVIOUS):
        if folder.is_symlink():  # a planted previous/ -> elsewhere is never read (nor written, see below)
            found.append((folder, None, RunError(f"run {run!r}: {PREVIOUS}/ is a symbolic link")))
            continue
        try:
            found.append((folder, read_manifest(folder, run), None))
        except RunError as exc:
            found.append((folder, None, exc))
    return found


def _present(folder: Path, name: str) -> bool:
    return os.path.lexists(folder / name)  # a planted symlink counts: its reader refuses it by name


def _legacy(run_dir: Path, run: str, pick: Picker) -> Checkpoint | None:
    """A run folder from before manifests: its files as they are, if they agree on the step."""
    available = [name for name in TENSOR_FILES if _present(run_dir, name)]
    if "model.safetensors" not in available:
        return None
    names = list(dict.fromkeys(["model.safetensors", *pick(run_dir, available)]))
    blobs = {name: read_tensor_file(run_dir / name, run) for name in names}
    try:
        raw_step = safetensors_metadata(blobs["model.safetensors"]).get("step", "0")
        step = int(raw_step) if raw_step.isdigit() and len(raw_step) < 14 else None
    except (ValueError, RecursionError):
        step = None  # the loader of the weights reports the damage with its own message
    state = read_json_file(run_dir / "state.json", MAX_JSON_BYTES, run, missing_ok=True)
    state = state if isinstance(state, dict) else {}
    if step is not None and "step" in state and whole_number(state["step"], "step", "state.json", run) != step:
        raise RunError(f"run {run!r}: the checkpoint is torn (model.safetensors is at step {step}, state.json "
                       f"at step {state['step']}): it was killed while saving; delete the run or restore a copy")
    return Checkpoint(run_dir, step or 0, whole_number(state.get("epoch", 0), "epoch", "state.json", run),
                      seconds(state.get("elapsed_s", 0.0), "elapsed_s", "state.json", run),
                      state.get("meta") if isinstance(state.get("meta"), dict) else {}, blobs)


def _latest(run_dir: Path, run: str, pick: Picker) -> Checkpoint | None:
    candidates = _candidates(run_dir, run)
    if all(manifest is None and error is None for _, manifest, error in candidates):
        return _legacy(run_dir, run, pick)
    first_error = None
    for folder, manifest, error in candidates:
        if manifest is None:
            first_error = first_error or error
            continue
        try:
            blobs = _verified(folder, manifest, pick(folder, list(manifest["files"])), run)
        except RunError as exc:
            first_error = first_error or exc
            continue
        return Checkpoint(folder, manifest["step"], manifest["epoch"], manifest["elapsed_s"], manifest["meta"],
                          blobs, fallback=folder != run_dir,
                          fallback_reason=str(first_error) if folder != run_dir and first_error else
                          f"{MANIFEST} is missing" if folder != run_dir else "")
    raise first_error or RunError(f"run {run!r}: no complete checkpoint")


def latest(run_dir: Path, run: str) -> Checkpoint | None:
    """The newest complete checkpoint with every file read and verified; the previous one when the
    newest is torn or damaged; None when the run never saved one (it starts over)."""
    return _latest(run_dir, run, lambda folder, names: names)


def latest_weights(run_dir: Path, run: str, use_ema: bool = True) -> tuple[str, bytes, str | None] | None:
    """(file name, verified bytes, fallback note) of the weights to sample from: the EMA weights when
    asked for and present, else the raw ones; from the previous checkpoint (and a note that says so)
    when the newest is torn."""
    def pick(folder: Path, names: list[str]) -> list[str]:
        ema = "ema.safetensors"
        return [ema if use_ema and ema in names and _present(folder, ema) else "model.safetensors"]
    found = _latest(run_dir, run, pick)
    if found is None:
        return None
    name = "ema.safetensors" if use_ema and "ema.safetensors" in found.blobs else "model.safetensors"
    return name, found.blobs[name], found.fallback_note


def summary(run_dir: Path, run: str) -> dict[str, Any] | None:
    """Step, epoch, elapsed_s and meta of the newest checkpoint without reading its tensors (for
    the run list); None when the run never saved one."""
    manifest = read_manifest(run_dir, run)
    if manifest is not None:
        return manifest
    state = read_json_file(run_dir / "state.json", MAX_JSON_BYTES, run, missing_ok=True)
    if state is None:
        return None
    if not isinstance(state, dict):
        raise RunError(f"run {run!r}: state.json is not a JSON object")
    meta = state.get("meta")
    return {"step": whole_number(state.get("step", 0), "step", "state.json", run),
            "epoch": whole_number(state.get("epoch", 0), "epoch", "state.json", run),
            "elapsed_s": seconds(state.get("elapsed_s", 0.0), "elapsed_s", "state.json", run),
            "meta": meta if isinstance(meta, dict) else {}}


def listed(run_dir: Path, run: str) -> tuple[dict[str, Any] | None, str | None]:
    """(summary, fallback note) for the run list: when the newest checkpoint is unusable the list
    shows the step the loaders will really use (previous/'s) and says so, instead of a step that
    cannot be loaded."""
    problem = newest_problem(run_dir, run)
    if problem is None:
        return summary(run_dir, run), None
    try:
        previous = None if (run_dir / PREVIOUS).is_symlink() else read_manifest(run_dir / PREVIOUS, run)
    except RunError:
        previous = None
    if previous is None:
        raise RunError(f"{problem} (and no intact previous checkpoint)")
    note = Checkpoint(run_dir / PREVIOUS, previous["step"], fallback=True, fallback_reason=problem).fallback_note
    return previous, note


def exists(run_dir: Path) -> bool:
    return any((folder / name).exists() for folder in (run_dir, run_dir / PREVIOUS)
               for name in (MANIFEST, "model.safetensors"))


# -- writing -----------------------------------------------------------------------------------------
def _root_is_complete(run_dir: Path, run: str) -> dict[str, Any] | None:
    """The run folder's manifest when its files match it (the checkpoint worth keeping)."""
    try:
        manifest = read_manifest(run_dir, run)
        if manifest is not None:
            _verified(run_dir, manifest, list(manifest["files"]), run)
        return manifest
    except RunError:
        return None


def _keep_as_previous(run_dir: Path, run: str) -> None:
    """previous/ := the run folder's current complete checkpoint, by hard links."""
    manifest = _root_is_complete(run_dir, run)
    if manifest is None:
        return  # torn or none: previous/ keeps the last complete one
    previous = real_folder(run_dir / PREVIOUS)
    (previous / MANIFEST).unlink(missing_ok=True)  # previous/ is incomplete until its manifest returns
    for name in TENSOR_FILES:
        target = previous / name
        if name not in manifest["files"]:
            target.unlink(missing_ok=True)
            continue
        staged = temp_path(target)
        staged.unlink(missing_ok=True)
        try:
            os.link(run_dir / name, staged)
        except OSError:  # a filesystem without hard links: copy (the size check was done above)
            write_new_file(staged, (run_dir / name).read_bytes())
        os.replace(staged, target)
        # rename(2) between two links of one file does nothing and leaves the source: when previous/
        # already held this very file (a checkpoint that failed after this step), drop the extra link.
        staged.unlink(missing_ok=True)
    atomic_write_text(previous / MANIFEST, (run_dir / MANIFEST).read_text(encoding="utf-8"))


def write(run_dir: Path, blobs: dict[str, bytes], *, step: int, epoch: int, elapsed_s: float,
          meta: dict[str, Any], position: dict[str, Any] | None = None) -> None:
    """Save a checkpoint of `blobs` (file name -> safetensors bytes); see the module docstring.
    `position`: more of where the run stands (world size, global batch, images of the epoch used),
    recorded beside the step in the manifest and state.json."""
    run = run_dir.name
    _keep_as_previous(run_dir, run)
    staged = {name: temp_path(run_dir / name) for name in blobs}
    try:
        for name, data in blobs.items():
            staged[name].unlink(missing_ok=True)
            write_new_file(staged[name], data)
    except BaseException:
        for path in staged.values():  # a full disk leaves neither half files nor temporary ones
            path.unlink(missing_ok=True)
        raise
    for name, path in staged.items():
        os.replace(path, run_dir / name)
    for name in TENSOR_FILES:
        if name not in blobs:  # e.g. an EMA file left by an older run; it is not part of this one
            (run_dir / name).unlink(missing_ok=True)
    fsync_folder(run_dir)
    record = {**(position or {}), "step": step, "epoch": epoch, "elapsed_s": elapsed_s, "meta": meta}
    files = {name: {"sha256": sha256_hex(data), "size": len(data)} for name, data in blobs.items()}
    atomic_write_text(run_dir / MANIFEST, json.dumps({**record, "files": files}, indent=1))
    fsync_folder(run_dir)
    atomic_write_text(run_dir / "state.json", json.dumps(record))


def real_folder(path: Path) -> Path:
    """`path` as a real folder of the run: a symlink planted in its place is removed (writing through
    it would write outside the run folder), then the folder is made if missing."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    path.mkdir(exist_ok=True)
    return path


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete temporary files that killed processes left (`.<name>.<pid>.tmp` whose pid is gone,
    or ours from before); called by the run's trainer while it holds the run's lock."""
    removed = []
    for folder in (run_dir, run_dir / PREVIOUS, run_dir / "samples"):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _TEMP.match(path.name)
            if match and (int(match.group(1)) == os.getpid() or not _pid_alive(int(match.group(1)))):
                if path.is_symlink() or path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True
