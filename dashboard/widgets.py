"""Small drawing helpers shared by the pages. `*_ui()` functions draw widgets and return plain values."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import streamlit as st

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
