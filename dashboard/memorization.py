"""The memorization check in the Evaluate panel: "did the model learn the images or copy them?".

A "Check for copies" action (sampler, steps, N, its time estimate) starts a `NearestCheckJob` through
the same EvaluationManager as Evaluate (one job at a time; its progress shows in the same status
panel), and the run's latest memorization entry of eval.json is shown plainly: the verdict, the
near-copy share of samples against held-out real images, the median nearest distances, the criterion
and the "sample | nearest training image" grid. eval.json and the grid are run files, possibly
damaged or hostile: each is read bounded and checked, and a bad one is one line of error.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import streamlit as st
from PIL import Image, UnidentifiedImageError

from core.errors import RunError
from core.evaluation.memorization import COPYING_SHARE
from core.evaluation.nearest import GRID_PREFIX
from core.store import runs
from core.store.io import MAX_IMAGE_BYTES, read_bounded_bytes
from dashboard import cache
from dashboard.charts import format_duration
from dashboard.state import evaluation_manager
from dashboard.widgets import sampler_setting_ui

DEFAULT_N = 256        # enough samples for a share to mean something, minutes at most on a CPU
SEARCH_S_PER_IMAGE = 0.01  # the nearest-neighbour search per sample and held-out image (exact, chunked)
MAX_GRID_PIXELS = 4096 * 4096  # the grid is 16 pairs of at most 64 px, scaled 3x: far below this
GRID_NAME = re.compile(re.escape(GRID_PREFIX) + r"[A-Za-z0-9._+-]{1,120}\.png")


@dataclass(frozen=True)
class CopyResult:
    """The figures of one memorization entry, range-checked."""
    setting: str
    n: int
    copying: bool
    near_copy_share: float
    heldout_share: float
    sample_median: float
    heldout_median: float
    criterion: str
    grid: str                   # file name inside the run's samples/ folder

    @property
    def verdict(self) -> str:
        return "copies its training images" if self.copying else "no sign of copying"


def _share(entry: dict[str, Any], key: str, upper: float = 1.0) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= upper:
        raise ValueError(f"{key} = {value!r} is not a number in [0, {upper:g}]")
    return float(value)


def parse_entry(entry: dict[str, Any]) -> CopyResult:
    """A memorization entry of eval.json as a CopyResult; ValueError (one line) when it is damaged."""
    copying, n, criterion, grid = entry.get("copying"), entry.get("n"), entry.get("criterion"), entry.get("grid")
    if not isinstance(copying, bool):
        raise ValueError(f"copying = {copying!r} is not true or false")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000_000:
        raise ValueError(f"n = {n!r} is not a sample count")
    if not isinstance(criterion, str) or not 0 < len(criterion) <= 200:
        raise ValueError("the criterion is missing or not a short text")
    name = Path(grid).name if isinstance(grid, str) and grid.startswith("samples/") else ""
    if not GRID_NAME.fullmatch(name) or grid != f"samples/{name}":
        raise ValueError(f"grid = {str(grid)[:80]!r} is not a samples/{GRID_PREFIX}*.png file of the run")
    setting = entry.get("setting")
    if not isinstance(setting, str) or not setting.startswith(GRID_PREFIX) or len(setting) > 120:
        raise ValueError(f"setting = {str(setting)[:80]!r} is not a memorization setting")
    # distances are pixel RMS differences of pixels in [0, 1]: at most 1
    return CopyResult(setting, n, copying, _share(entry, "near_copy_share"),
                      _share(entry, "pixels_heldout_near_copy_share"),
                      _share(entry, "pixels_sample_nearest_median"), _share(entry, "pixels_heldout_nearest_median"),
                      criterion, name)


def latest_entry(run_dir: Path) -> dict[str, Any] | None:
    """The run's last memorization entry of eval.json (entries are appended), None if it has none.
    RunError when eval.json itself is damaged."""
    entries = [e for e in runs.read_eval(run_dir) if e.get("kind") == "memorization"]
    return entries[-1] if entries else None


def read_grid(run_dir: Path, name: str) -> Image.Image:
    """The grid PNG of the run's samples/ folder, bounded and fully decoded; RunError when it is not
    a readable regular file inside the run or not a PNG of sensible size."""
    folder = run_dir / "samples"
    if folder.is_symlink() or not folder.is_dir():
        raise RunError(f"run {run_dir.name!r}: samples/ is not a folder of the run; check the run again")
    data = read_bounded_bytes(folder / name, MAX_IMAGE_BYTES, run_dir.name)
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        if image.width * image.height > MAX_GRID_PIXELS:
            raise RunError(f"run {run_dir.name!r}: samples/{name} is {image.width}x{image.height} pixels, "
                           "too large for a grid; check the run again")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise RunError(f"run {run_dir.name!r}: samples/{name} is not a readable PNG (damaged?); "
                       "check the run for copies again to rewrite it") from None
    return image


def check_ui(info: runs.RunInfo, prefix: str, start: Callable[..., None]) -> None:
    """Sampler, steps and N for the memorization check, its time estimate, and the button."""
    params = sampler_setting_ui(info, f"{prefix}_mem", DEFAULT_N, 64,
                                "Samples judged; as many held-out real images are judged too",
                                ("Sampler for the check", "Check steps", "Samples to check (N)"))
    sampling = cache.sampling_estimate(info, params["sampler"], params["steps"], params["n"])
    seconds = sampling.seconds + 2 * params["n"] * SEARCH_S_PER_IMAGE
    st.caption(f"Estimated check time: about **{format_duration(seconds)}**. Runs in the background; the entry "
               "goes into the run's eval.json and the grid into its samples/, as "
               "`python -m core eval --nearest` writes them.")
    busy = evaluation_manager().job is not None and evaluation_manager().job.alive
    st.button("Check for copies", icon=":material/content_copy:", key=f"{prefix}_mem_button", on_click=start,
              args=(str(info.path), params, prefix, "nearest"), disabled=busy,
              help="One evaluation at a time" if busy else None)


def result_ui(run_dir: Path) -> None:
    """The run's latest memorization result, plainly; a damaged entry or grid is one line of error."""
    try:
        entry = latest_entry(run_dir)
    except RunError as exc:
        st.error(str(exc))
        return
    if entry is None:
        return
    try:
        result = parse_entry(entry)
    except ValueError as exc:
        st.error(f"Run {run_dir.name!r}: its latest memorization entry in eval.json is damaged ({exc}); "
                 "check the run for copies again.")
        return
    icon = ":material/warning:" if result.copying else ":material/check_circle:"
    st.markdown(f"{icon} **{run_dir.name}** ({result.setting}, N = {result.n}): **{result.verdict}**.")
    st.markdown(f"Near-copies: **{result.near_copy_share:.0%}** of the samples, against "
                f"**{result.heldout_share:.0%}** of held-out real images. Median distance to the nearest "
                f"training image: **{result.sample_median:.3f}** for samples, **{result.heldout_median:.3f}** "
                "for held-out images (pixel RMS, 0 = identical).")
    st.caption(f"Criterion: a sample is a near-copy when {result.criterion} (its nearest training image is "
               "much closer than the next ones); the run copies when at least "
               f"{COPYING_SHARE:.0%} of its samples are, and more than of the held-out images.")
    try:
        grid = read_grid(run_dir, result.grid)
    except (RunError, FileNotFoundError) as exc:
        st.error(str(exc))
        return
    st.image(grid, caption="Each pair: a sample | its nearest training image, most copy-like first")


def memorization_ui(info: runs.RunInfo, prefix: str, start: Callable[..., None]) -> None:
    """The "Check for copies" action and the run's latest result, under the Evaluate action; `start`
    is the Evaluate panel's (run_dir, params, prefix, kind) starter: one manager, one feedback line."""
    st.markdown("**Check for copies**: did the model learn the images or copy them?")
    check_ui(info, prefix, start)
    result_ui(info.path)
