"""Reverse page, conditional runs (step 10): a class picker, a guidance slider, a grid with one row
per class, and a guidance explorer that draws the same seeds at several γ side by side.

Also the Compare page's fidelity–diversity chart: conditional accuracy against Fréchet distance
across γ, from `python -m core eval --guidance-sweep`.

`conditional_ui` only draws widgets and returns plain values; `guided_grids` (cached) does the work
through `core.sampling.sample`. Nothing here is drawn for an unconditional run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from core.store import runs
from core.config import BUILTIN_CLASS_NAMES, ConfigError, SampleConfig
from core.diffusion.sampling import sample
from core.diffusion.guidance import check_guidance, class_names, default_guidance, per_class_labels
from dashboard import cache
from dashboard.charts import scaled_grid

ALL_CLASSES = -1                      # the class picker's "one row per class" entry
MAX_PER_CLASS = 6                     # 10 rows x 6 = 60 images: under the page's 64-image ceiling
EXPLORER_SCALES = (0.0, 1.0, 3.0, 7.0)
EXPLORER_CHOICES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0)
EXPLORER_PER_CLASS = 2                # images per class in the explorer's grids when all classes are shown
GUIDANCE_HELP = ("Classifier-free guidance γ: 0 ignores the label (unconditional), 1 is the plain conditional "
                 "model, above 1 pushes further towards the class: sharper, more typical, less varied. "
                 "The book uses 3.")


def conditional_ui(info: runs.RunInfo, n: int) -> dict:
    """The class and guidance for a conditional run, as {'labels', 'guidance', 'n', 'ncol'}; {} otherwise.

    `n` is the page's image count, used when a single class is picked.
    """
    config = info.config
    if config is None or not config.model.conditional:
        return {}
    names = class_names(config.data)
    c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
    picked = c1.selectbox("Class", [ALL_CLASSES, *range(len(names))], key="rev_class", persist_state="session",
                          format_func=lambda k: "All classes (one row per class)" if k == ALL_CLASSES
                          else f"{k} · {names[k]}")
    guidance = c2.slider("Guidance γ", 0.0, 10.0, float(default_guidance(config)), 0.5, key="rev_guidance",
                         persist_state="session", help=GUIDANCE_HELP)
    c3.number_input("Images per class", min_value=1, max_value=MAX_PER_CLASS, value=4,
                    key="rev_per_class", disabled=picked != ALL_CLASSES, persist_state="session")
    del guidance
    return conditional_params(info, n)


def conditional_params(info: runs.RunInfo, n: int) -> dict:
    """What `conditional_ui`'s widgets hold now (session state); {} for an unconditional run."""
    config = info.config
    if config is None or not config.model.conditional or "rev_class" not in st.session_state:
        return {}
    state = st.session_state
    picked, guidance = state["rev_class"], float(state["rev_guidance"])
    if picked == ALL_CLASSES:
        per_class = int(state["rev_per_class"])
        labels = per_class_labels(range(len(class_names(config.data))), per_class).tolist()
        return {"labels": labels, "guidance": guidance, "n": len(labels), "ncol": per_class}
    return {"labels": [int(picked)] * n, "guidance": guidance, "n": n, "ncol": None}


def describe(meta: dict, dataset: str | None) -> str:
    """' · class Sneaker · γ = 3' for the result's caption ('' for unconditional runs); at γ = 0 the
    label is ignored, and the caption says so instead of naming a class the images are not of."""
    if not meta.get("labels"):
        return ""
    if meta["guidance"] == 0:
        return " · γ = 0: the class is ignored, these are unconditional samples"
    present = sorted(set(meta["labels"]))
    # The run's own names (a folder's subfolders); results made before they were recorded: the dataset's.
    names = meta.get("class_names") or (class_names(dataset) if dataset in BUILTIN_CLASS_NAMES else ())
    what = f"class {names[present[0]]}" if len(present) == 1 and len(names) > present[0] else \
        f"{len(present)} classes, one row each"
    return f" · {what} · γ = {meta['guidance']:g}"


LABEL_PX = 96  # the left margin that holds the class names of a one-row-per-class grid


def labelled_rows(grid: np.ndarray, names: list[str]) -> np.ndarray:
    """A grid with one row per class, its class names written in a left margin (white on black)."""
    from PIL import Image, ImageDraw
    height = grid.shape[0]
    canvas = Image.new("L", (grid.shape[1] + LABEL_PX, height), 0)
    canvas.paste(Image.fromarray(grid), (LABEL_PX, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = height / max(1, len(names))
    for i, name in enumerate(names):
        draw.text((4, int(row_h * i + row_h / 2) - 6), name[:14], fill=255)
    return np.asarray(canvas)


def row_names(meta: dict, dataset: str | None) -> list[str] | None:
    """The class of each row of a one-row-per-class result (None for any other grid)."""
    if not meta.get("labels") or not meta.get("ncol") or not dataset:
        return None
    names = class_names(dataset)
    labels = meta["labels"][::meta["ncol"]]
    return [names[k] for k in labels]


@st.cache_data(show_spinner=False, max_entries=16)
def guided_grids(run_dir: str, mtime: float, use_ema: bool, sampler: str, steps: int, seed: int,
                 labels: tuple[int, ...], scales: tuple[float, ...]) -> list[np.ndarray]:
    """uint8 (n, 28, 28) samples per γ, all from the same seed: only the guidance differs."""
    del mtime  # only part of the cache key
    loaded = cache.load_run_model(Path(run_dir), use_ema=use_ema)
    sched = cache.scheduler_for(loaded.config)
    config = SampleConfig(sampler=sampler, steps=steps, n=len(labels), seed=seed)
    train = loaded.config.train
    return [sample(loaded.model, sched, config, pixel_range=train.pixel_range, clip_default=train.clip_denoised,
                   device=cache.DEVICE, labels=torch.tensor(labels), guidance=g, prediction=train.prediction,
                   shape=loaded.config.data.shape).images
            for g in scales]


def explorer_ui(info: runs.RunInfo, params: dict) -> None:
    """The same seeds at several γ side by side: fidelity rises with γ, diversity falls."""
    if not params.get("labels"):
        return
    with st.expander("Guidance explorer: the same seeds at several γ", expanded=False):
        scales = st.multiselect("Guidance scales γ", EXPLORER_CHOICES, default=list(EXPLORER_SCALES),
                                key="rev_explore_scales", format_func=lambda g: f"{g:g}")
        labels = params["labels"]
        if params.get("ncol"):  # all classes: a shorter grid, so four of them fit side by side
            labels = per_class_labels(sorted(set(labels)), EXPLORER_PER_CLASS).tolist()
        ncol = EXPLORER_PER_CLASS if params.get("ncol") else int(np.ceil(np.sqrt(len(labels))))
        if not st.button("Compare guidance scales", icon=":material/compare:", key="rev_explore"):
            what = (f"{EXPLORER_PER_CLASS} per class, {len(labels)} images" if params.get("ncol")
                    else f"{len(labels)} images of the chosen class")
            st.caption(f"Samples {what} at each γ, with the sampler, steps and seed above; γ = 0 ignores the class.")
            return
        try:
            for g in scales:
                check_guidance(g)
            config = SampleConfig(sampler=params["sampler"], steps=params["steps"], n=len(labels), seed=params["seed"])
            config.resolved_steps(info.config.schedule.timesteps)
        except ConfigError as exc:
            st.error(f"Not generated: {exc}")
            return
        with st.spinner(f"Sampling {len(labels)} images at {len(scales)} guidance scales..."):
            grids = guided_grids(str(info.path), cache.weights_mtime(info.path, params["use_ema"]),
                                 params["use_ema"], params["sampler"], params["steps"], params["seed"],
                                 tuple(labels), tuple(sorted(scales)))
        per_row = min(4, max(1, len(scales)))  # four across at most, so each stays large enough to read
        ordered = sorted(scales)
        for start in range(0, len(ordered), per_row):
            for column, g, images in zip(st.columns(per_row), ordered[start:start + per_row],
                                         grids[start:start + per_row]):
                note = " (class ignored)" if g == 0 else ""
                column.image(scaled_grid(images, ncol=ncol, target_px=240), caption=f"γ = {g:g}{note}",
                             width="stretch")


def tradeoff_figure(named_evals: dict[str, list[dict]]) -> go.Figure | None:
    """Conditional accuracy against Fréchet distance, one line per run and sampler setting, a point per
    γ: guidance buys accuracy (fidelity) and, past some γ, pays in distance (diversity). None if no
    evaluation has a guidance scale."""
    series: dict[str, list[dict]] = {}
    for name, entries in named_evals.items():
        for entry in entries:
            if isinstance(entry, dict) and "guidance" in entry and "conditional_accuracy" in entry and "fd" in entry:
                base = str(entry.get("setting", "")).rsplit("-g", 1)[0]
                series.setdefault(f"{name} · {base}", []).append(entry)
    if not series:
        return None
    fig = go.Figure()
    for label, entries in series.items():
        entries = sorted(entries, key=lambda e: e["guidance"])
        fig.add_trace(go.Scatter(x=[e["fd"] for e in entries], y=[e["conditional_accuracy"] for e in entries],
                                 mode="lines+markers+text", text=[f"γ={e['guidance']:g}" for e in entries],
                                 textposition="top center", name=label))
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="Fréchet distance (lower is better)",
                      yaxis_title="conditional accuracy", legend=dict(orientation="h", y=-0.3))
    return fig


def tradeoff_ui(named_evals: dict[str, list[dict]]) -> None:
    """The Compare page's chart of the guidance sweep, when a chosen run has one."""
    figure = tradeoff_figure(named_evals)
    if figure is not None:
        st.caption("Guidance sweep of conditional runs: each point one γ. Accuracy (the share of samples the "
                   "classifier puts in the requested class) rises with γ; the Fréchet distance falls while the "
                   "samples get more typical, then rises as they lose variety.")
        st.plotly_chart(figure, key="cmp_guidance_chart")
