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
from dashboard import cache
from dashboard.charts import assign_colours, loss_figure, metrics_frame, sweep_fd_figure
from dashboard.state import job_manager, runs_dir
from dashboard.widgets import show_grid

SHIPPED_SWEEP = "blog-ablation"
BUDGET_LABELS = {"images": "training images", "steps": "optimizer steps", "seconds": "seconds of training"}
MODE_LABELS = {"grid": "grid: every combination", "path": "path: one change at a time, in the order written",
               "blog": "the blog's ablation path (book → improved; ignores the preset and factors)"}


def sweep_picker_ui(names: list[str]) -> str:
    default = names.index(SHIPPED_SWEEP) if SHIPPED_SWEEP in names else 0
    return st.selectbox("Sweep", names, index=default, key="exp_sweep",
                        help="Sweeps live in <runs>/sweeps/; the shipped one is the blog's ablation path")


def _create_sweep() -> None:
    """The form's sweep, planned and checked in full, then created and queued (or refused, creating nothing)."""
    s = st.session_state
    mode = s["exp_new_mode"]
    try:
        factors = [sweeps.parse_factor(line) for line in s["exp_new_factors"].splitlines() if line.strip()] \
            if mode != "blog" else []
        evaluation = sweeps.default_evaluation(int(s["exp_new_eval_n"]), s["exp_new_eval_sampler"],
                                               int(s["exp_new_eval_steps"]))
        sweep = sweeps.plan(s["exp_new_name"].strip(), None if mode == "blog" else s["exp_new_preset"],
                            sweeps.Budget(s["exp_new_budget_kind"], float(s["exp_new_budget"])),
                            mode="grid" if mode == "blog" else mode, factors=factors,
                            path="blog" if mode == "blog" else None, evaluation=evaluation)
        sweeps.enqueue(runs_dir(), sweep)
    except (ConfigError, runs.RunError, OSError) as exc:  # SweepError is a ConfigError; queue errors RunErrors
        s["exp_feedback"] = ("error", f"Not created: {exc}")
        return
    job_manager().ensure_queue_runner(runs_dir(), eval_device=cache.DEVICE)
    s["exp_feedback"] = ("success", f"Sweep **{sweep.name}**: {len(sweep.runs)} runs queued "
                                    f"({sweep.budget.describe()}); they train one after another (Train page, Queue).")
    s["exp_sweep"] = sweep.name


def new_sweep_ui() -> None:
    with st.expander("New sweep", expanded=False):
        with st.form("exp_new_form", border=False):
            c1, c2 = st.columns(2)
            c1.text_input("Name", value="sweep-1", key="exp_new_name")
            c2.radio("Kind", list(MODE_LABELS), format_func=MODE_LABELS.get, key="exp_new_mode")
            c1.selectbox("Base preset", sorted(PRESETS), index=sorted(PRESETS).index("tiny"), key="exp_new_preset",
                         help="Every run starts from it (the blog path always starts from book)")
            c2.text_area("Factors, one per line", value="optimizer=adam,adamw", key="exp_new_factors",
                         help="name=value1,value2; tuples as 1/2/2; flags as on/off. Choose from: "
                              + ", ".join(sweeps.factor_names()))
            c3, c4, c5, c6, c7 = st.columns(5)
            c3.selectbox("Budget", list(BUDGET_LABELS), format_func=BUDGET_LABELS.get, key="exp_new_budget_kind",
                         help="The same for every run; images are fair on a busy machine")
            c4.number_input("Amount", min_value=0.0, value=20.0, step=10.0, key="exp_new_budget")
            c5.number_input("Score at N", min_value=0, max_value=10_000, value=64, key="exp_new_eval_n",
                            help="0: do not score")
            c6.selectbox("Sampler", SAMPLER_NAMES, index=SAMPLER_NAMES.index(DEFAULT_FEW_STEP_SAMPLER),
                         format_func=SAMPLER_LABELS.get, key="exp_new_eval_sampler")
            c7.number_input("Steps", min_value=1, value=DEFAULT_FEW_STEPS, key="exp_new_eval_steps")
            st.form_submit_button("Create and queue", icon=":material/queue:", on_click=_create_sweep)
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

# -- results ---------------------------------------------------------------------------------------------
# The answer first (what changed, its score), the bookkeeping after; the CSV keeps the file's order.
SHOWN = ("label", "fd", "fd_ratio", "final_loss", "state", "steps", "images", "train_s", "class_entropy", "floor",
         "setting", "n", "run", "changes", "error")
table = pd.DataFrame(rows, columns=list(SHOWN))
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
pending = [r["run"] for r in rows if r["state"] != "finished"]
if pending:
    st.caption(f"Not finished yet: {', '.join(pending)} (the run queue trains them; Train page).")

figure = sweep_fd_figure(rows)
st.subheader("Fréchet distance per run")
if figure is None:
    st.caption("No run of this sweep is scored yet.")
else:
    st.plotly_chart(figure, key="exp_fd_chart")

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
