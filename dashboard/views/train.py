"""Train: a form (filled by presets) that starts one background training run, and its live progress.

The job lives in the process-wide `JobManager`, so a reload or a second tab shows the same run;
the page only polls snapshots with `st.fragment(run_every=...)` while the job is alive.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from core import runs
from core.config import (DATASET_LABELS, DATASET_NAMES, DEVICE_NAMES, LABEL_DROPOUT_MODES, MODEL_LABELS,
                         OPTIMIZER_LABELS, OPTIMIZER_NAMES, SCHEDULE_NAMES, ConfigError)
from core.jobs import JobBusy
from core.training import Progress
from dashboard.charts import format_duration, live_loss_figure, upscale
from dashboard.presets import (DEFAULT_PRESET, FORM_FIELDS, FORM_PRESETS, config_from_form, default_run_name,
                               form_values)
from dashboard.state import job_manager, runs_dir
from dashboard.widgets import STATE_ICONS

MODEL_ORIGIN = {"unet": "the book", "improved_unet": "the blog"}
POLL_S = 1.5

manager = job_manager()


# -- callbacks (run before the page script, so they may set widget values) ---------------------------
def _apply_preset() -> None:
    name = st.session_state["train_preset"]
    values = form_values(FORM_PRESETS[name])
    for field, value in values.items():
        st.session_state[f"f_{field}"] = value
    st.session_state["f_run_name"] = default_run_name(name, values["model"], values["optimizer"])


def _start_training() -> None:
    preset = st.session_state["train_preset"]
    values = {field: st.session_state[f"f_{field}"] for field in FORM_FIELDS}
    name = str(st.session_state.get("f_run_name", "")).strip()
    try:
        config = config_from_form(preset, values)
        manager.start_new(runs_dir(), name, config)
    except JobBusy as exc:
        st.session_state["train_feedback"] = ("warning", str(exc))
    except (ConfigError, runs.RunError, OSError) as exc:
        st.session_state["train_feedback"] = ("error", f"Not started: {exc}")
    else:
        st.session_state["train_feedback"] = ("success", f"Started run **{name}**.")
        st.session_state["f_run_name"] = default_run_name(preset, values["model"], values["optimizer"])


def _resume(run_dir: str) -> None:
    try:
        manager.resume(Path(run_dir))
    except (JobBusy, runs.RunError, ConfigError) as exc:
        st.session_state["train_feedback"] = ("warning", str(exc))
    else:
        st.session_state["train_feedback"] = ("success", f"Resumed run **{Path(run_dir).name}**.")


# -- widgets -----------------------------------------------------------------------------------------
def preset_ui() -> str:
    if "train_preset" not in st.session_state:
        st.session_state["train_preset"] = DEFAULT_PRESET
        _apply_preset()
    return st.selectbox("Preset", list(FORM_PRESETS), key="train_preset", on_change=_apply_preset,
                        persist_state="session",
                        help="Fills the form. Book: step 9 exactly. Improved (blog): ImprovedUNet + AdamW + EMA. "
                             "Quick CPU demo: five minutes on a CPU. Tiny smoke test: a few seconds, to try the UI.")


def train_form_ui() -> None:
    """The form; its submit button starts the run through the `_start_training` callback."""
    keep = {"persist_state": "session"}
    with st.form("train_form", border=True):
        c1, c2, c3 = st.columns([2, 1, 1])
        c1.text_input("Run name", key="f_run_name", help="Becomes the folder name: letters, digits, . _ -", **keep)
        c2.selectbox("Dataset", DATASET_NAMES, format_func=DATASET_LABELS.get, key="f_dataset", **keep)
        c3.selectbox("Device", DEVICE_NAMES, key="f_device", **keep)
        c1, c2, c3, c4 = st.columns(4)
        c1.selectbox("Model", list(MODEL_LABELS), format_func=lambda m: f"{MODEL_LABELS[m]} ({MODEL_ORIGIN[m]})",
                     key="f_model", **keep)
        c2.number_input("Base channels", min_value=4, max_value=512, step=4, key="f_base_channels", **keep)
        c3.selectbox("Optimizer", OPTIMIZER_NAMES, format_func=OPTIMIZER_LABELS.get, key="f_optimizer", **keep)
        c4.number_input("EMA decay (0 = off)", min_value=0.0, max_value=0.99999, step=0.001, format="%g",
                        key="f_ema_decay", **keep)
        c1, c2, c3, c4 = st.columns(4)
        c1.number_input("Learning rate", min_value=0.0, max_value=1.0, step=1e-4, format="%g", key="f_lr", **keep)
        c2.number_input("Weight decay", min_value=0.0, max_value=10.0, step=0.01, format="%g",
                        key="f_weight_decay", help="Adam: an L2 term in the gradient. AdamW: decoupled.", **keep)
        c3.number_input("Batch size", min_value=1, max_value=60_000, step=16, key="f_batch_size", **keep)
        c4.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key="f_seed", **keep)
        c1, c2, c3, c4 = st.columns(4)
        c1.number_input("Epochs", min_value=0, max_value=100_000, step=1, key="f_epochs", **keep)
        c2.number_input("Max steps (0 = no limit)", min_value=0, step=100, key="f_max_steps", **keep)
        c3.number_input("Time budget, s (0 = none)", min_value=0.0, step=60.0, format="%g",
                        key="f_time_budget_s", **keep)
        c4.number_input("Use first N images (0 = all)", min_value=0, step=512, key="f_limit_images", **keep)
        c1, c2, _, _ = st.columns(4)
        c1.number_input("Timesteps T", min_value=2, max_value=10_000, step=10, key="f_timesteps", **keep)
        c2.selectbox("Noise schedule", SCHEDULE_NAMES, key="f_schedule", **keep)
        conditional_fields_ui(keep)
        st.form_submit_button("Train", icon=":material/rocket_launch:", type="primary", on_click=_start_training)


def conditional_fields_ui(keep: dict) -> None:
    """Step 10's options: class labels, and the label dropout that classifier-free guidance needs."""
    c1, c2, c3, _ = st.columns(4)
    c1.selectbox("Class labels", (0, 10), key="f_num_classes", **keep,
                 format_func=lambda k: "none (unconditional)" if k == 0 else f"{k} classes (step 10)",
                 help="A label embedding lets you ask for a class when sampling (step 10 of the book).")
    c2.number_input("Label dropout", min_value=0.0, max_value=0.99, step=0.05, format="%g", key="f_label_dropout",
                    help="Share of labels dropped while training, so the same network also learns the "
                         "unconditional ε̂ that guidance needs (book: 0.1; 0 = no guidance).", **keep)
    c3.selectbox("Dropout per", LABEL_DROPOUT_MODES, key="f_label_dropout_mode", **keep,
                 format_func={"sample": "sample", "batch": "batch (the book)"}.get)


def feedback_ui() -> None:
    """The outcome of the last Train / Resume click, right under the form."""
    feedback = st.session_state.pop("train_feedback", None)
    if feedback:
        kind, text = feedback
        getattr(st, kind)(text)


def resume_ui() -> None:
    candidates = [i for i in runs.list_runs(runs_dir()) if i.readable and i.state in runs.RESUMABLE_STATES]
    with st.expander(f"Resume a run ({len(candidates)} can be resumed)"):
        if not candidates:
            st.caption("Stopped, interrupted and failed runs show up here.")
            return
        by_name = {i.name: i for i in candidates}
        name = st.selectbox("Run to resume", list(by_name), key="resume_pick",
                            format_func=lambda n: f"{n} "
                                                  f"(step {by_name[n].step}, {by_name[n].state})")
        st.button("Resume", icon=":material/play_arrow:", on_click=_resume, args=(str(by_name[name].path),),
                  key="resume_button")


# -- live progress -----------------------------------------------------------------------------------
def _fraction(p: Progress) -> float:
    if p.total_steps:
        return p.fraction
    try:  # bounded by a time budget alone
        budget = runs.load_config(Path(p.run_dir)).train.time_budget_s
    except runs.RunError:
        return 0.0
    return min(1.0, p.elapsed_s / budget) if budget else 0.0


def _latest_grid(p: Progress) -> tuple[np.ndarray, str] | None:
    path = Path(p.latest_grid) if p.latest_grid else None
    if path is None or not path.is_file():
        grids = sorted((Path(p.run_dir) / "samples").glob("*.png"), key=lambda f: f.stat().st_mtime)
        path = grids[-1] if grids else None
    if path is None:
        return None
    with Image.open(path) as img:
        return np.asarray(img.convert("L")), path.stem


def progress_ui(p: Progress) -> None:
    icon = STATE_ICONS.get(p.state, STATE_ICONS["running"])
    st.markdown(f"#### {icon} Run `{p.run_name}` — {p.state}" + (f" ({p.message})" if p.message else ""))
    total = f"/{p.total_steps}" if p.total_steps else ""
    epochs = f"/{p.epochs}" if p.epochs else ""
    st.progress(_fraction(p), text=f"step {p.step}{total} · epoch {p.epoch}{epochs} · "
                                   f"{p.images_per_s:,.0f} images/s · ETA {format_duration(p.eta_s)}")
    c1, c2, c3, c4, c5 = st.columns(5)
    c1.metric("Step", f"{p.step}{total}")
    c2.metric("Epoch", f"{p.epoch}{epochs}")
    c3.metric("Images/s", f"{p.images_per_s:,.0f}")
    c4.metric("ETA", format_duration(p.eta_s) if p.active else "—")
    c5.metric("Last loss", f"{p.losses[-1]:.4f}" if p.losses else "—")
    if p.state == "failed":
        st.error(f"Training failed: {p.error}")
    left, right = st.columns([3, 2])
    with left:
        st.caption("Loss (MSE between ε and the model's ε̂), logged every few steps")
        if p.steps:
            st.plotly_chart(live_loss_figure(p.steps, p.losses), key="train_loss_chart")
        else:
            st.info("The loss curve appears after the first logged steps.")
    with right:
        grid = _latest_grid(p)
        st.caption("Latest sample grid (written at the end of each epoch and of the run)")
        if grid is not None:
            st.image(upscale(grid[0], 360), caption=grid[1])
        else:
            st.info("No sample grid yet.")


def job_panel() -> None:
    job = manager.job
    alive_at_full_run = job is not None and job.alive

    @st.fragment(run_every=POLL_S if alive_at_full_run else None)
    def live() -> None:
        current = manager.job
        if current is None:
            st.info("No run has been trained in this server session yet. Pick a preset and click **Train**.")
            return
        p = current.snapshot()
        progress_ui(p)
        if p.active:  # the thread outlives its last report by a moment: go by the reported state
            if st.button("Stop", icon=":material/stop:", key="stop_button",
                         help="Saves a checkpoint, then stops; resume it later."):
                manager.stop()
                st.toast("Stopping: saving a checkpoint first.")
        if alive_at_full_run and not current.alive:
            st.rerun()  # the job just ended: a full rerun drops the polling and refreshes the run lists
        if current.traceback:
            with st.expander("Traceback"):
                st.code(current.traceback)

    live()


st.title("Train")
st.caption("Pick a preset, adjust the settings, click **Train**. Training runs in the background on this "
           "server, one run at a time; reloading the page or opening a second tab shows the same run.")
if manager.job is not None:  # the current (or last) run first: that is what a returning user looks for
    job_panel()
    st.divider()
st.subheader("New run")
preset_ui()
train_form_ui()
feedback_ui()
resume_ui()
