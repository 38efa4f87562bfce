"""Small drawing helpers shared by the pages. `*_ui()` functions draw widgets and return plain values."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import streamlit as st

from core.config import DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS, SAMPLER_LABELS, SAMPLER_NAMES
from core.store.runs import RunInfo

from .charts import run_label, scaled_grid

# Material icons render in Streamlit markdown everywhere (emoji need an emoji font on the viewer's machine).
STATE_ICONS = {"finished": ":material/check_circle:", "stopped": ":material/pause_circle:",
               "interrupted": ":material/warning:", "failed": ":material/error:", "damaged": ":material/broken_image:",
               "running": ":material/directions_run:", "created": ":material/fiber_new:"}


def show_grid(images: np.ndarray, caption: str | None = None, ncol: int | None = None,
              target_px: int = 420) -> None:
    """A sample grid scaled up by whole pixels, so 28×28 images stay crisp."""
    st.image(scaled_grid(images, ncol=ncol, target_px=target_px), caption=caption)


def run_picker_ui(infos: Sequence[RunInfo], label: str = "Run", key: str | None = None,
                  help: str | None = None) -> RunInfo | None:
    """A select box over runs, labelled model + optimizer · name; None when there are none."""
    if not infos:
        return None
    by_name = {info.name: info for info in infos}
    if key is not None and st.session_state.get(key) not in by_name:
        st.session_state.pop(key, None)  # a deleted (or renamed) run: fall back to the first
    name = st.selectbox(label, list(by_name), key=key, help=help, persist_state="session" if key else None,
                        format_func=lambda n: f"{run_label(by_name[n])} ({by_name[n].state})")
    return by_name.get(name)


def sampleable(infos: Sequence[RunInfo]) -> list[RunInfo]:
    """Runs whose config reads and which have weights to sample from."""
    return [i for i in infos if i.readable and i.config is not None and (i.path / "model.safetensors").exists()]


def sampler_setting_ui(info: RunInfo, key_prefix: str, default_n: int, n_step: int, n_help: str,
                       labels: tuple[str, str, str] = ("Sampler", "Steps", "Images (N)")) -> dict:
    """Sampler, steps (1 to T; none for DDPM) and N in one row, as Evaluate and Check for copies ask
    them: {"sampler", "steps" (0 = all T), "n"}. Two rows on one page need their own labels (a
    label names one widget, for a reader and for a browser test alike)."""
    T = info.config.schedule.timesteps
    c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="bottom")
    sampler = c1.selectbox(labels[0], SAMPLER_NAMES, index=SAMPLER_NAMES.index(DEFAULT_FEW_STEP_SAMPLER),
                           format_func=SAMPLER_LABELS.get, key=f"{key_prefix}_sampler")
    steps = c2.number_input(f"{labels[1]} (1 to {T})", min_value=1, max_value=T, value=min(DEFAULT_FEW_STEPS, T),
                            key=f"{key_prefix}_steps", disabled=sampler == "ddpm",
                            help="DDPM always runs all T steps")
    n = c3.number_input(labels[2], min_value=2, max_value=10_000, value=default_n, step=n_step,
                        key=f"{key_prefix}_n", help=n_help)
    return {"sampler": sampler, "steps": 0 if sampler == "ddpm" else int(steps), "n": int(n)}
