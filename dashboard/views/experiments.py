"""Experiments: which change helps, and by how much. A sweep's results table, its Fréchet distance per
run (each bar labelled with the change it made), its loss curves overlaid and same-seed samples;
and a form that defines a new sweep and puts its runs in the run queue.

Everything shown is read from the sweep folder and its run folders (`core.sweeps`), so a sweep made
with `python -m core sweep` and one made here look the same.
"""
from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from core.store import runs
from core.work import sweeps
from core.config import DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS, PRESETS, SAMPLER_LABELS, SAMPLER_NAMES, \
    ConfigError
from dashboard import cache, reading
from dashboard.charts import assign_colours, loss_figure, metrics_frame, sweep_fd_figure
from dashboard.state import job_manager, runs_dir
from dashboard.widgets import show_grid

SHIPPED_SWEEP = "blog-ablation"
MIN_RUN_STEPS = 20       # fewer optimiser steps leave a run at the noise ceiling: nothing to compare
DEFAULT_BUDGET = ("steps", 60.0)  # the tiny preset's runs: about a minute each on a busy 2-core machine
POLL_S = 5.0             # how often a page with unfinished runs looks for them to finish
BUDGET_LABELS = {"images": "training images", "steps": "optimizer steps", "seconds": "seconds of training"}
MODE_LABELS = {"grid": "grid: every combination", "path": "path: one change at a time, in the order written",
               "blog": "the blog's ablation path (book → improved; ignores the preset and factors)"}


def sweep_picker_ui(names: list[str]) -> str:
    """The sweep shown; kept in the address (?sweep=...) so a reload stays on it."""
    wanted = st.session_state.get("exp_sweep") or st.query_params.get("sweep")
    if wanted not in names:
        wanted = SHIPPED_SWEEP if SHIPPED_SWEEP in names else names[0]
    st.session_state["exp_sweep"] = wanted
    name = st.selectbox("Sweep", names, key="exp_sweep",
                        help="Sweeps live in <runs>/sweeps/; the shipped one is the blog's ablation path")
    st.query_params["sweep"] = name
    return name


def _planned() -> sweeps.Sweep:
    """The form's sweep, planned and checked in full (ConfigError names what is wrong)."""
    s = st.session_state
    mode = s["exp_new_mode"]
    factors = [sweeps.parse_factor(line) for line in s["exp_new_factors"].splitlines() if line.strip()] \
        if mode != "blog" else []
    evaluation = sweeps.default_evaluation(int(s["exp_new_eval_n"]), s["exp_new_eval_sampler"],
                                           int(s["exp_new_eval_steps"]))
    sweep = sweeps.plan(s["exp_new_name"].strip(), None if mode == "blog" else s["exp_new_preset"],
                        sweeps.Budget(s["exp_new_budget_kind"], float(s["exp_new_budget"])),
                        mode="grid" if mode == "blog" else mode, factors=factors,
                        path="blog" if mode == "blog" else None, evaluation=evaluation)
    short = [r for r in sweep.runs if r.config.train.max_steps and r.config.train.max_steps < MIN_RUN_STEPS]
    if short:
        raise ConfigError(f"budget = {sweep.budget.describe()} gives {short[0].config.train.max_steps} optimizer "
                          f"steps per run, under the minimum of {MIN_RUN_STEPS}: such runs stay at the noise "
                          "ceiling. Raise the amount.")
    return sweep


def short_run_warnings(sweep: sweeps.Sweep) -> list[str]:
    """Runs that would end before their learning-rate warm-up or their EMA has averaged anything."""
    notes = []
    for run in sweep.runs:
        train = run.config.train
        steps = train.max_steps
        if not steps:
            continue  # a time budget: the step count is not known in advance
        if train.warmup_steps and steps < train.warmup_steps:
            notes.append(f"{run.label}: {steps} steps, shorter than its {train.warmup_steps}-step warm-up "
                         "(it never reaches its learning rate)")
        horizon = round(1 / (1 - train.ema_decay)) if train.ema_decay else 0
        if horizon and steps < horizon:
            notes.append(f"{run.label}: {steps} steps, shorter than its EMA horizon of {horizon} steps "
                         f"(decay {train.ema_decay:g}: the EMA weights are still mostly the initial ones)")
    return notes


def _create_sweep() -> None:
    """The form's sweep, created and queued (or refused, creating nothing)."""
    s = st.session_state
    try:
        sweep = _planned()
        sweeps.enqueue(runs_dir(), sweep)
    except (ConfigError, runs.RunError, OSError) as exc:  # SweepError is a ConfigError; queue errors RunErrors
        s["exp_feedback"] = ("error", f"Not created: {exc}")
        return
    job_manager().ensure_queue_runner(runs_dir(), eval_device=cache.DEVICE)
    s["exp_feedback"] = ("success", f"Sweep **{sweep.name}**: {len(sweep.runs)} runs queued "
                                    f"({sweep.budget.describe()}); they train one after another (Train page, Queue).")
    s["exp_sweep"] = sweep.name
    st.query_params["sweep"] = sweep.name


def new_sweep_ui() -> None:
    with st.expander("New sweep", expanded=False):
        c1, c2 = st.columns(2)
        c1.text_input("Name", value="sweep-1", key="exp_new_name")
        c2.radio("Kind", list(MODE_LABELS), format_func=MODE_LABELS.get, key="exp_new_mode")
        c1.selectbox("Base preset", sorted(PRESETS), index=sorted(PRESETS).index("tiny"), key="exp_new_preset",
                     help="Every run starts from it (the blog path always starts from book)")
        c2.text_area("Factors, one per line", value="optimizer=adam,adamw", key="exp_new_factors",
                     help="name=value1,value2; tuples as 1/2/2; flags as on/off. Choose from: "
                          + ", ".join(sweeps.factor_names()))
        c3, c4, c5, c6, c7 = st.columns(5)
        c3.selectbox("Budget", list(BUDGET_LABELS), index=list(BUDGET_LABELS).index(DEFAULT_BUDGET[0]),
                     format_func=BUDGET_LABELS.get, key="exp_new_budget_kind",
                     help="The same for every run; images and steps are fair on a busy machine")
        c4.number_input("Amount", min_value=1.0, value=DEFAULT_BUDGET[1], step=10.0, key="exp_new_budget",
                        help=f"At least {MIN_RUN_STEPS} optimizer steps per run")
        c5.number_input("Score at N", min_value=0, max_value=10_000, value=64, key="exp_new_eval_n",
                        help="0: do not score. Only this sweep's runs are scored.")
        c6.selectbox("Sampler", SAMPLER_NAMES, index=SAMPLER_NAMES.index(DEFAULT_FEW_STEP_SAMPLER),
                     format_func=SAMPLER_LABELS.get, key="exp_new_eval_sampler")
        c7.number_input("Steps", min_value=1, value=DEFAULT_FEW_STEPS, key="exp_new_eval_steps")
        try:
            planned = _planned()
        except ConfigError as exc:
            st.warning(f"Not ready: {exc}", icon=":material/warning:")
        else:
            steps = {r.config.train.max_steps for r in planned.runs}
            st.caption(f"{len(planned.runs)} runs, " + (f"{', '.join(map(str, sorted(steps)))} optimizer steps each."
                                                        if all(steps) else f"{planned.budget.describe()}."))
            for note in short_run_warnings(planned):
                st.warning(note, icon=":material/hourglass_empty:")
        st.button("Create and queue", icon=":material/queue:", on_click=_create_sweep, key="exp_create")
    feedback = st.session_state.pop("exp_feedback", None)
    if feedback:
        getattr(st, feedback[0])(feedback[1])


st.title("Experiments")
st.caption("Which change helps, and by how much: every run of a sweep trains on the same budget and is scored "
           "with the shipped classifier, so the table reads across.")
new_sweep_ui()

names = sweeps.list_sweeps(runs_dir())
if not names:
    st.info("No sweeps yet. Define one above, or run `python -m core sweep --preset tiny --vary optimizer=adam,adamw "
            "--budget-steps 20 --eval-n 64`.")
    st.stop()
name = sweep_picker_ui(names)
try:
    definition = sweeps.load(runs_dir(), name)
except runs.RunError as exc:
    st.error(str(exc))
    st.stop()
rows = sweeps.results(runs_dir(), definition)
budget = sweeps.Budget(definition["budget"]["kind"], definition["budget"]["amount"])
evaluation = sweeps.evaluation_of(definition)
st.markdown(f"**{definition['mode']}** from `{definition['base']}`, {len(rows)} runs, {budget.describe()}; "
            + (f"scored with {SAMPLER_LABELS[evaluation.sampler]}, {evaluation.steps} steps, N = {evaluation.n}."
               if evaluation else "not scored."))

# -- the answer first ------------------------------------------------------------------------------------
def seed_spread(run_names: set[str]) -> reading.Repeat | None:
    """A seed repeat of one of this sweep's runs, from any sweep in the runs folder (None: single seed)."""
    scored = []
    for other in names:
        try:
            other_rows = rows if other == name else sweeps.results(runs_dir(), sweeps.load(runs_dir(), other))
        except runs.RunError:
            continue
        for row in other_rows:
            if row["fd"] is None:
                continue
            try:
                scored.append((row["run"], runs.load_config(runs.run_path(runs_dir(), row["run"])), row["fd"],
                               row["setting"]))
            except (runs.RunError, ConfigError):
                continue
    pairs = [p for p in reading.seed_repeats(scored) if run_names & set(p.runs)]
    return pairs[0] if pairs else None


for row in rows:
    row["verdict"] = reading.verdict(row["fd"], row["floor"], row["noise"])
repeat = seed_spread({r["run"] for r in rows})
spread = repeat.spread if repeat is not None else None
found = reading.effects(rows, spread)
st.subheader("What each change did")
answer = pd.DataFrame([{"step": e.index, "change": e.label, "Fréchet distance": e.fd,
                        "verdict": rows[e.index - 1]["verdict"],
                        "vs the step before": "" if e.delta is None else f"{e.delta:+.0%}",
                        "spread": reading.spread_text(e.delta, e.within_noise, spread)} for e in found])
st.dataframe(answer, hide_index=True, key="exp_answer", width="stretch",
             column_config={"Fréchet distance": st.column_config.NumberColumn(format="%.3g")})
st.info(reading.reading(found, spread), icon=":material/lightbulb:")
if repeat is not None:
    st.caption(f"Seed spread from {repeat.runs[0]} and {repeat.runs[1]}: the same recipe with another seed "
               f"scored {repeat.fds[0]:.3g} and {repeat.fds[1]:.3g} ({repeat.spread:.0%} apart).")
else:
    st.caption("Single seed: no run of this sweep has a repeat with another seed, so the spread is unknown.")
pending = [r["run"] for r in rows if r["state"] != "finished"]


@st.fragment(run_every=POLL_S if pending else None)
def watch_pending() -> None:
    """While runs are unfinished, look every few seconds; redraw the page once their states change."""
    if not pending:
        return
    now = [(r["state"], r["fd"]) for r in sweeps.results(runs_dir(), definition)]
    if now != [(r["state"], r["fd"]) for r in rows]:
        st.rerun()  # a full run: the tables, the chart and this watcher (off once all are finished)
    st.caption(f"Not finished yet: {', '.join(pending)} (the run queue trains them; Train page). "
               "This page updates when they finish.")


watch_pending()

figure = sweep_fd_figure(rows)
st.subheader("Fréchet distance per run")
if figure is None:
    st.caption("No run of this sweep is scored yet.")
else:
    st.plotly_chart(figure, key="exp_fd_chart")

# -- the full table --------------------------------------------------------------------------------------
SHOWN = ("label", "fd", "fd_ratio", "verdict", "final_loss", "state", "steps", "images", "train_s",
         "class_entropy", "floor", "setting", "n", "run", "changes", "error")
table = pd.DataFrame(rows, columns=list(SHOWN))
st.subheader("All results")
st.dataframe(table, hide_index=True, key="exp_table", width="stretch",
             column_config={c: st.column_config.NumberColumn(format="%.4g")
                            for c in ("final_loss", "fd", "fd_ratio", "floor", "class_entropy", "train_s")})
c1, c2 = st.columns(2)
as_csv = pd.DataFrame(rows, columns=list(sweeps.RESULT_FIELDS)).to_csv(index=False)
c1.download_button("Results as CSV", data=as_csv.encode("utf-8"), file_name=f"{name}-results.csv", mime="text/csv",
                   icon=":material/download:", on_click="ignore", key="exp_csv")
c2.download_button("Results as JSON", data=json.dumps(rows, indent=2).encode("utf-8"),
                   file_name=f"{name}-results.json", mime="application/json", icon=":material/download:",
                   on_click="ignore", key="exp_json")

# -- loss curves -----------------------------------------------------------------------------------------
infos = [runs.run_info(runs.run_path(runs_dir(), r["run"])) for r in rows if r["state"] != "missing"]
readable = [i for i in infos if i.readable and i.config is not None]
st.subheader("Loss curves")
curves = metrics_frame([(i, runs.read_metrics(i.path)) for i in readable], 0.6)
if curves.empty:
    st.caption("No run has logged a step yet.")
else:
    colours = assign_colours([i.name for i in readable])
    if curves["regime"].nunique() > 1:
        st.caption("Runs with [0, 1] and [−1, 1] pixels differ in loss scale: compare those by Fréchet distance.")
    st.plotly_chart(loss_figure(curves, "step", True, colours=colours), key="exp_loss_chart")

# -- samples from one seed -------------------------------------------------------------------------------
st.subheader("Samples from the same seed")
with_weights = [i for i in readable if i.step > 0]
show = st.toggle("Show samples (DPM-Solver++(2M) SDE, 20 steps, seed 0, EMA weights where the run has them)",
                 value=False, key="exp_show_samples")
if show:
    for info in with_weights:
        label = next(r["label"] for r in rows if r["run"] == info.name)
        steps = min(DEFAULT_FEW_STEPS, info.config.schedule.timesteps)
        images = cache.preview_samples(str(info.path), cache.weights_mtime(info.path), 0, steps=steps)
        show_grid(images, caption=f"{label} · {info.name}", ncol=cache.COMPARE_SAMPLES, target_px=970)
