"""Compare: overlay the loss curves of chosen runs, their evaluations and steps-versus-quality, score
them per timestep, sample them from one seed; evaluate a run from here.

Everything shown is read from run folders (metrics.csv, config.json, eval.json) or computed by
cached helpers, so reopening the page costs nothing. The cheap parts draw first; the heavy ones
(per-timestep scores, samples) come last, each with a time estimate and a progress bar.
"""
from __future__ import annotations

import streamlit as st

from core.store import runs
from core.config import DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS, SAMPLER_LABELS, SAMPLER_NAMES
from dashboard import cache, guidance, reading
from dashboard.charts import (X_AXES, assign_colours, bucket_figure, class_shares_figure, config_diff, evals_frame,
                              format_duration, loss_figure, metrics_frame, quality_groups, run_label,
                              steps_quality_figure)
from dashboard.evaluate import evaluate_ui, evaluation_status_ui
from dashboard.state import runs_dir
from dashboard.widgets import sampleable, show_grid

DEMO_RUNS = ("demo-book-unet-adam", "demo-improved-unet-adamw")
BUCKETS = 10


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
    c1, c2, c3 = st.columns([2, 3, 1], vertical_alignment="bottom")
    weight = c1.slider("Smoothing (EMA weight)", 0.0, 0.99, 0.6, 0.01, key="cmp_smooth", persist_state="session")
    x_axis = c2.radio("x-axis", list(X_AXES), horizontal=True, key="cmp_x", persist_state="session",
                      help="fraction of run: 0 to 1 for every run, so a short run is not lost beside a long one")
    log_y = c3.toggle("Log scale", value=True, key="cmp_log", persist_state="session")
    return weight, x_axis, log_y


def sampler_choice_ui(prefix: str, min_T: int) -> tuple[str, int]:
    """Sampler and steps for the same-seed samples (the best few-step setting first)."""
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    sampler = c1.selectbox("Sampler", SAMPLER_NAMES, index=SAMPLER_NAMES.index(DEFAULT_FEW_STEP_SAMPLER),
                           format_func=SAMPLER_LABELS.get, key=f"{prefix}_sampler", persist_state="session")
    steps = c2.number_input("Steps", min_value=1, max_value=max(1, min_T), value=min(DEFAULT_FEW_STEPS, min_T),
                            key=f"{prefix}_steps", persist_state="session", disabled=sampler == "ddpm",
                            help="DDPM runs all T steps of each run")
    return sampler, int(steps)


def colours_for(names: list[str]) -> dict[str, str]:
    """Colours kept for the whole session: a run keeps its colour whatever else is picked."""
    st.session_state["cmp_colours"] = assign_colours(names, st.session_state.get("cmp_colours"))
    return st.session_state["cmp_colours"]


st.title("Compare")
st.caption("Overlay runs: loss curves (one colour per run, kept while the page is open), the settings that "
           "differ, evaluations and steps versus quality, the loss per timestep range, samples from the same "
           "starting noise.")

readable = [i for i in runs.list_runs(runs_dir()) if i.readable and i.config is not None]
if not readable:
    st.info("No runs yet. Train one on the **Train** page (the *Tiny smoke test* preset takes about a minute).")
    st.stop()

chosen = runs_ui(readable)
if not chosen:
    st.info("Pick at least one run above.")
    st.stop()
colours = colours_for([i.name for i in chosen])
label_colours = {run_label(i): colours[i.name] for i in chosen}

# -- loss curves ---------------------------------------------------------------------------------------
st.subheader("Loss curves")
weight, x_axis, log_y = curve_options_ui()
table = metrics_frame([(info, runs.read_metrics(info.path)) for info in chosen], weight)
if table.empty:
    st.info("The chosen runs have not logged any steps yet.")
else:
    if table["regime"].nunique() > 1:
        st.warning("These runs differ in pixel range or noise schedule (shown in the legend), so their ε-losses "
                   "do not compare: a [0, 1] run's loss reads lower than a [−1, 1] run's at equal quality. "
                   "Compare the **x̂0 error per timestep** below, or the evaluations.",
                   icon=":material/compare_arrows:")
    st.plotly_chart(loss_figure(table, x_axis, log_y, colours=colours), key="cmp_loss_chart")
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
        st.dataframe(diff, key="cmp_diff", width="stretch")

# -- evaluations ---------------------------------------------------------------------------------------
evals = {info.name: info.evals for info in chosen if info.evals}
st.subheader("Evaluations")
if evals:
    st.caption("From each run's eval.json (the Evaluate action below, or `python -m core eval`); compare numbers "
               "taken with the same classifier and the same sample count.")
    every = evals_frame(evals)
    every.insert(3, "classifier", [f"{str(sha)[:6]} ({acc:.1%})" if isinstance(acc, (int, float)) else str(sha)[:6]
                                   for sha, acc in zip(every.get("classifier_sha256", [None] * len(every)),
                                                       every.get("classifier_accuracy", [None] * len(every)))])
    missing = [None] * len(every)  # entries without a figure (a guidance sweep, a memorization check)
    every.insert(6, "verdict", [reading.verdict(*v) for v in zip(every.get("fd", missing),
                                                                 every.get("fd_floor", missing),
                                                                 every.get("fd_noise", missing))])
    if every["classifier"].nunique() > 1:  # distances from two classifiers are on two scales: never one table
        kinds = every["classifier"].value_counts().index.tolist()
        chosen_clf = st.selectbox("Classifier", kinds, key="cmp_eval_classifier",
                                  help="Fréchet distances are measured in a classifier's features: figures from "
                                       "different classifiers do not compare, so the table shows one at a time")
        st.caption(f"{len(every) - int((every['classifier'] == chosen_clf).sum())} entries taken with another "
                   "classifier are hidden; pick it above to see them.")
        every = every[every["classifier"] == chosen_clf]
    headline = [c for c in ("run", "setting", "n", "classifier", "fd", "fd_ratio", "verdict", "fd_floor",
                            "class_entropy", "weights", "seconds") if c in every.columns]
    numbers = {c: st.column_config.NumberColumn(format="%.4g")
               for c in ("fd", "fd_floor", "fd_ratio", "fd_noise", "class_entropy", "mean_confidence")}
    st.dataframe(every[headline], hide_index=True, key="cmp_evals", width="stretch", column_config=numbers)
    with st.expander("Every field of the evaluations"):
        st.dataframe(every, hide_index=True, key="cmp_evals_all", width="stretch", column_config=numbers)
    groups = quality_groups(evals)
    if groups:
        st.markdown("**Steps versus quality**")
        keys = list(groups)
        pick = 0
        if len(keys) > 1:
            pick = st.selectbox("Figures taken with", range(len(keys)), key="cmp_quality_group",
                                format_func=lambda i: f"N = {keys[i][0]}, classifier {keys[i][1] or '?'} "
                                                      f"({sum(len(v) for v in groups[keys[i]].values())} entries)",
                                help="Only figures of the same N and the same classifier share a chart")
        n, sha = keys[pick]
        st.caption(f"Fréchet distance against network evaluations per image, one line per run and sampler "
                   f"(N = {n}, classifier {sha or '?'}); a run's DDPM figure is its dashed horizontal line.")
        shown = groups[keys[pick]]
        elsewhere = {run: min(ddpm, key=lambda e: e["fd"]) for run, entries in evals.items()
                     if not any(e.get("sampler") == "ddpm" for e in shown.get(run, []))
                     and (ddpm := [e for e in entries if isinstance(e, dict) and e.get("sampler") == "ddpm"
                                   and isinstance(e.get("fd"), (int, float))])}
        st.plotly_chart(steps_quality_figure(shown, colours, elsewhere=elsewhere), key="cmp_quality_chart")
    shares = class_shares_figure(evals)
    if shares is not None:
        st.caption("Which classes the samples look like, by the classifier: an even spread is what the "
                   "dataset has; a tall bar is a model that favours one kind of garment.")
        st.plotly_chart(shares, key="cmp_shares_chart")
    guidance.tradeoff_ui(evals)  # conditional runs: accuracy against distance across γ (step 10)
else:
    st.caption("None of the chosen runs has been evaluated yet: use **Evaluate a run** below.")

with_weights = sampleable(chosen)
with st.expander("Evaluate a run", expanded=not evals):
    if with_weights:
        by_name = {i.name: i for i in with_weights}
        target = st.selectbox("Run to evaluate", list(by_name), key="cmp_eval_run",
                              format_func=lambda n: run_label(by_name[n]))
        evaluate_ui(by_name[target], "cmp")
    else:
        st.caption("None of the chosen runs has weights yet.")
evaluation_status_ui("cmp")

# -- loss per timestep ---------------------------------------------------------------------------------
st.subheader("Loss per timestep range")
space = st.radio("Measure", ["x0", "eps"], horizontal=True, key="cmp_bucket_space", persist_state="session",
                 format_func={"x0": "error of the predicted x̂0, [0, 1] pixels (comparable across pixel ranges)",
                              "eps": "MSE of ε (the training loss)"}.get)
st.caption(f"On the first {cache.BUCKET_IMAGES} test images, split into {BUCKETS} ranges of t; same images, "
           "timesteps and noise for every run. Low t: fine detail; high t: overall layout.")
# One forward pass of BUCKET_IMAGES images per bucket: the cost of BUCKETS sampling steps at that batch.
estimate = sum(cache.sampling_estimate(i, "ddim", BUCKETS, cache.BUCKET_IMAGES).seconds for i in with_weights)
if st.button(f"Compute loss per timestep (about {format_duration(max(1.0, estimate))})", icon=":material/bar_chart:",
             key="cmp_buckets_button"):
    st.session_state["cmp_buckets"] = True
if st.session_state.get("cmp_buckets") and with_weights:
    series, totals = {}, {}
    bar = st.progress(0.0, text="Scoring each run on a fixed batch of test images...")
    for k, info in enumerate(with_weights):
        label = run_label(info)
        bar.progress(k / len(with_weights), text=f"Scoring {info.name} ({k + 1} of {len(with_weights)})...")
        series[label] = cache.timestep_losses(str(info.path), cache.weights_mtime(info.path), space=space)
        totals[label] = info.config.schedule.timesteps
    bar.empty()
    y_title = "MSE of x̂0 ([0, 1] pixels)" if space == "x0" else "MSE of ε"
    st.plotly_chart(bucket_figure(series, totals, log_y, colours=label_colours, y_title=y_title),
                    key="cmp_bucket_chart")

# -- samples from one seed -----------------------------------------------------------------------------
st.subheader("Samples from the same seed")
min_T = min((i.config.schedule.timesteps for i in with_weights), default=DEFAULT_FEW_STEPS)
sampler, steps = sampler_choice_ui("cmp_samples", min_T)
c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
seed = int(c1.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, key="cmp_seed",
                           persist_state="session"))
show = c2.toggle("Show samples", value=True, key="cmp_show_samples", persist_state="session")
setting = SAMPLER_LABELS[sampler] + ("" if sampler == "ddpm" else f", {steps} steps")
c2.caption(f"{setting}, {cache.COMPARE_SAMPLES} images per run, EMA weights when the run has them: the same "
           "starting noise for every run.")
if show and with_weights:
    seconds = sum(cache.sampling_estimate(i, sampler, min(steps, i.config.schedule.timesteps),
                                          cache.COMPARE_SAMPLES).seconds for i in with_weights)
    bar = st.progress(0.0, text=f"Sampling {len(with_weights)} runs (about {format_duration(max(1.0, seconds))} "
                                "the first time; cached after)...")
    for k, info in enumerate(with_weights):
        bar.progress(k / len(with_weights), text=f"Sampling {info.name} ({k + 1} of {len(with_weights)})...")
        images = cache.preview_samples(str(info.path), cache.weights_mtime(info.path), seed, steps=steps,
                                       sampler=sampler)
        show_grid(images, caption=run_label(info), ncol=cache.COMPARE_SAMPLES, target_px=970)
    bar.empty()
missing = [i.name for i in chosen if i not in with_weights]
if missing:
    st.caption("No weights yet: " + ", ".join(missing))
