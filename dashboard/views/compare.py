"""Compare: overlay the loss curves of chosen runs, score them per timestep, sample them from one seed.

Everything shown is read from run folders (metrics.csv, config.json, eval.json) or computed by
cached helpers, so reopening the page costs nothing.
"""
from __future__ import annotations

import streamlit as st

from core import runs
from dashboard import cache, guidance
from dashboard.charts import (X_AXES, bucket_figure, class_shares_figure, config_diff, evals_frame, loss_figure,
                              metrics_frame, run_label)
from dashboard.state import runs_dir
from dashboard.widgets import sampleable, show_grid

DEMO_RUNS = ("demo-book-unet-adam", "demo-improved-unet-adamw")


def runs_ui(infos: list[runs.RunInfo]) -> list[runs.RunInfo]:
    by_name = {i.name: i for i in infos}
    demos = [n for n in DEMO_RUNS if n in by_name]
    default = demos or list(by_name)[:2]
    st.session_state.setdefault("cmp_runs", default)
    st.session_state["cmp_runs"] = [n for n in st.session_state["cmp_runs"] if n in by_name]
    names = st.multiselect("Runs to compare", list(by_name), key="cmp_runs", persist_state="session",
                           format_func=lambda n: run_label(by_name[n]))
    return [by_name[n] for n in names]


def curve_options_ui() -> tuple[float, str, bool]:
    c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
    weight = c1.slider("Smoothing (EMA weight)", 0.0, 0.99, 0.6, 0.01, key="cmp_smooth", persist_state="session")
    x_axis = c2.radio("x-axis", list(X_AXES), horizontal=True, key="cmp_x", persist_state="session")
    log_y = c3.toggle("Log scale", value=True, key="cmp_log", persist_state="session")
    return weight, x_axis, log_y


st.title("Compare")
st.caption("Overlay runs: loss curves (one colour per run, legend = model + optimizer), the loss per "
           "timestep range, samples from the same starting noise, the settings that differ, evaluations.")

readable = [i for i in runs.list_runs(runs_dir()) if i.readable and i.config is not None]
if not readable:
    st.info("No runs yet. Train one on the **Train** page (the *Tiny smoke test* preset takes seconds).")
    st.stop()

chosen = runs_ui(readable)
if not chosen:
    st.info("Pick at least one run above.")
    st.stop()

# -- loss curves ---------------------------------------------------------------------------------------
st.subheader("Loss curves")
weight, x_axis, log_y = curve_options_ui()
table = metrics_frame([(info, runs.read_metrics(info.path)) for info in chosen], weight)
if table.empty:
    st.info("The chosen runs have not logged any steps yet.")
else:
    st.plotly_chart(loss_figure(table, x_axis, log_y), key="cmp_loss_chart")
    st.download_button("Metrics as CSV", data=table.to_csv(index=False).encode("utf-8"), icon=":material/download:",
                       file_name="compare-metrics.csv", mime="text/csv", on_click="ignore", key="cmp_csv")

# -- settings that differ ------------------------------------------------------------------------------
st.subheader("Settings that differ")
if len(chosen) < 2:
    st.caption("Pick two or more runs to see what differs between them.")
else:
    diff = config_diff({info.name: info.config for info in chosen})
    if diff.empty:
        st.caption("The chosen runs have identical settings (only the random seeds of sampling differ).")
    else:
        st.dataframe(diff, key="cmp_diff")

# -- evaluations ---------------------------------------------------------------------------------------
evals = {info.name: info.evals for info in chosen if info.evals}
st.subheader("Evaluations")
if evals:
    st.caption("From each run's eval.json (`python -m core eval`); compare numbers taken with the same "
               "classifier and the same sample count.")
    st.dataframe(evals_frame(evals), hide_index=True, key="cmp_evals")
    shares = class_shares_figure(evals)
    if shares is not None:
        st.caption("Which classes the samples look like, by the classifier: an even spread is what the "
                   "dataset has; a tall bar is a model that favours one kind of garment.")
        st.plotly_chart(shares, key="cmp_shares_chart")
    guidance.tradeoff_ui(evals)  # conditional runs: accuracy against distance across γ (step 10)
else:
    st.caption("None of the chosen runs has been evaluated yet (`python -m core eval --run NAME`).")

with_weights = sampleable(chosen)

# -- loss per timestep ---------------------------------------------------------------------------------
st.subheader("Loss per timestep range")
st.caption(f"The ε-prediction MSE on the first {cache.BUCKET_IMAGES} test images, split into 10 ranges of t; "
           "same images, timesteps and noise for every run. Low t: fine detail; high t: overall layout.")
if st.button("Compute loss per timestep", icon=":material/bar_chart:", key="cmp_buckets_button"):
    st.session_state["cmp_buckets"] = True
if st.session_state.get("cmp_buckets") and with_weights:
    series, totals = {}, {}
    with st.spinner("Scoring each run on a fixed batch of test images..."):
        for info in with_weights:
            label = run_label(info)
            series[label] = cache.timestep_losses(str(info.path), cache.weights_mtime(info.path))
            totals[label] = info.config.schedule.timesteps
    st.plotly_chart(bucket_figure(series, totals, log_y), key="cmp_bucket_chart")

# -- samples from one seed -----------------------------------------------------------------------------
st.subheader("Samples from the same seed")
c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
seed = int(c1.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="cmp_seed",
                           persist_state="session"))
show = c2.toggle("Show samples", value=True, key="cmp_show_samples", persist_state="session")
c2.caption(f"DDIM, {cache.COMPARE_STEPS} steps, {cache.COMPARE_SAMPLES} images per run, EMA weights when the "
           "run has them: the same starting noise for every run.")
if show:
    for info in with_weights:
        with st.spinner(f"Sampling {info.name}..."):
            images = cache.preview_samples(str(info.path), cache.weights_mtime(info.path), seed)
        show_grid(images, caption=run_label(info), ncol=cache.COMPARE_SAMPLES, target_px=970)
    missing = [i.name for i in chosen if i not in with_weights]
    if missing:
        st.caption("No weights yet: " + ", ".join(missing))
