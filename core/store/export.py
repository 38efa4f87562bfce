"""Turn uint8 images into files people keep: PNG grids, a GIF of the reverse process, .npz frames,
and a zip bundle of a run folder. Everything returns bytes, so the dashboard can offer downloads
and the CLI can write files through the same code.
"""
from __future__ import annotations

import io
import os
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid as tv_make_grid

from ..errors import RunError
from .io import MAX_IMAGE_BYTES, MAX_METRICS_BYTES, MAX_TENSOR_BYTES, atomic_write_bytes, read_bounded_bytes

BUNDLE_FILES = ("config.json", "metrics.csv", "model.safetensors", "ema.safetensors", "eval.json",
                "state.json", "status.json")


def as_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, C, H, W) with C 1 or 3 -> (N, C, H, W); anything else is refused."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[1] not in (1, 3)):
        raise ValueError(f"expected uint8 images of shape (N, H, W) or (N, C, H, W) with C 1 or 3, "
                         f"got {images.dtype} {images.shape}")
    return images[:, None] if images.ndim == 3 else images


def to_display(images: np.ndarray) -> np.ndarray:
    """uint8 (..., C, H, W) -> what image widgets show: (..., H, W) grayscale or (..., H, W, 3) colour."""
    images = np.asarray(images)
    if images.shape[-3] == 1:
        return images[..., 0, :, :]
    return np.moveaxis(images, -3, -1)


def make_grid(images: np.ndarray, ncol: int | None = None, padding: int = 2, scale: int = 1,
              pad_value: int = 0) -> np.ndarray:
    """uint8 (N, H, W) or (N, C, H, W) -> one uint8 grid image, (h, w) grayscale or (h, w, 3) colour,
    row-major like the book's plot (torchvision's `make_grid`), optionally enlarged `scale` times
    with sharp pixels."""
    images = as_nchw(images)
    ncol = ncol or max(1, math.ceil(math.sqrt(len(images))))
    grid = tv_make_grid(torch.from_numpy(images), nrow=ncol, padding=padding, pad_value=pad_value).numpy()
    # torchvision repeats one channel to three: a grayscale grid keeps one
    grid = grid[0] if images.shape[1] == 1 else np.ascontiguousarray(grid.transpose(1, 2, 0))
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """A grid (h, w) or (h, w, 3) as PNG bytes: grayscale stays 8-bit L, colour is RGB."""
    buf = io.BytesIO()
    image = np.asarray(image, np.uint8)
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: np.ndarray, ncol: int | None = None, scale: int = 2) -> bytes:
    return png_bytes(make_grid(images, ncol=ncol, scale=scale))


def save_grid(path: str | Path, images: np.ndarray, ncol: int | None = None, scale: int = 2) -> Path:
    # atomic: a half-written PNG never shows on a page
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, grid_png(images, ncol, scale))
    return path


def reverse_gif(frames_xt: np.ndarray, frame_timesteps: list[int], final: np.ndarray | None = None,
                ncol: int | None = None, scale: int = 2, max_frames: int = 100,
                duration_ms: int = 60, frames_x0: np.ndarray | None = None) -> bytes:
    """A GIF of x_t going from noise to images: frames (K, N, H, W) or (K, N, C, H, W) in recorded order.

    With `frames_x0` (same shape) each frame shows x_t | x̂0 side by side; the closing frame shows
    the finished images once, centred on the same canvas."""
    frames_xt = np.asarray(frames_xt)
    if frames_xt.ndim not in (4, 5) or len(frames_xt) == 0:
        raise ValueError("reverse_gif needs recorded frames of shape (K, N, [C,] H, W); sample with frames on")
    if frames_x0 is not None and np.shape(frames_x0) != frames_xt.shape:
        raise ValueError(f"frames_x0 {np.shape(frames_x0)} must match frames_xt {frames_xt.shape}")
    idx = np.unique(np.linspace(0, len(frames_xt) - 1, min(max_frames, len(frames_xt))).round().astype(int))

    def picture(i: int) -> np.ndarray:
        left = make_grid(frames_xt[i], ncol=ncol, scale=scale)
        if frames_x0 is None:
            return left
        gap = np.full((left.shape[0], 4 * scale, *left.shape[2:]), 255, np.uint8)
        return np.hstack([left, gap, make_grid(np.asarray(frames_x0)[i], ncol=ncol, scale=scale)])

    arrays = [picture(i) for i in idx]
    if final is not None:
        grid = make_grid(final, ncol=ncol, scale=scale)
        canvas = np.zeros_like(arrays[0])
        left = (canvas.shape[1] - grid.shape[1]) // 2
        canvas[:grid.shape[0], left:left + grid.shape[1]] = grid
        arrays.append(canvas)
    pictures = [Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB") for a in arrays]
    durations = [duration_ms] * (len(pictures) - 1) + [1500]  # rest on the result
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)
    return buf.getvalue()


def frames_npz(images: np.ndarray, frame_timesteps: list[int], frames_xt: np.ndarray | None,
               frames_x0: np.ndarray | None) -> bytes:
    """images (N,C,H,W), timesteps (K,), x_t and x̂0 frames (K,N,C,H,W), all uint8 but the timesteps."""
    buf = io.BytesIO()
    arrays = {"images": images, "timesteps": np.asarray(frame_timesteps, np.int64)}
    if frames_xt is not None:
        arrays["x_t"] = frames_xt
    if frames_x0 is not None:
        arrays["pred_x0"] = frames_x0
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


OPTIMIZER_FILE = "optimizer.safetensors"


def run_bundle(run_dir: str | Path, include_optimizer: bool = False) -> bytes:
    """A zip of a run: config, metrics, weights, evaluation and sample grids; with `include_optimizer`
    also the optimizer state, so a stopped run can be resumed where it is unpacked.

    Only regular files inside the run folder go in: a file planted as a symlink (metrics.csv ->
    a secret, samples/x.png -> /etc/passwd) is left out, never followed, and so is a run folder
    or samples folder that is itself a symlink.
    """
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise RunError(f"run {run_dir.name!r}: the run folder is a symbolic link or missing; nothing to bundle")
    buf = io.BytesIO()
    names = BUNDLE_FILES + ((OPTIMIZER_FILE,) if include_optimizer else ())
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            limit = MAX_TENSOR_BYTES if name.endswith(".safetensors") else MAX_METRICS_BYTES
            _add(zf, run_dir / name, f"{run_dir.name}/{name}", limit, run_dir.name)
        samples = run_dir / "samples"
        if samples.is_dir() and not samples.is_symlink():
            for png in sorted(samples.glob("*.png")):
                if _hard_linked(png):  # a second name of a file from elsewhere (never written by a run)
                    continue
                _add(zf, png, f"{run_dir.name}/samples/{png.name}", MAX_IMAGE_BYTES, run_dir.name)
    return buf.getvalue()


def _hard_linked(path: Path) -> bool:
    try:
        return os.lstat(path).st_nlink > 1
    except OSError:
        return True


def _add(zf: zipfile.ZipFile, path: Path, arcname: str, limit: int, run: str) -> None:
    try:
        data = read_bounded_bytes(path, limit, run, missing_ok=True)  # O_NOFOLLOW, regular files only
    except RunError:
        return  # a symlink, a device, a pipe or an oversized file: not part of the bundle
    if data is not None:
        zf.writestr(arcname, data)
