"""Runs: every run folder in one table, with resume, a zip download, and delete (after a confirmation).

Damaged folders are listed with the reason they cannot be read; nothing about them can break the page.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from core.store import runs
from core.config import MODEL_LABELS, OPTIMIZER_LABELS, PIXEL_RANGE_LABELS, ConfigError
from core.store.export import run_bundle
from core.work.jobs import JobBusy
from dashboard import cache, data_source
from dashboard.charts import format_duration
from dashboard.evaluate import evaluate_ui, evaluation_status_ui
from dashboard.state import job_manager, runs_dir


def training_seconds(info: runs.RunInfo) -> float | None:
    """Wall-clock training time of a run: the last logged elapsed_s (it continues across resumes)."""
    rows = runs.read_metrics(info.path) if info.readable else []
    return rows[-1].get("elapsed_s") if rows else None


def latest_score(info: runs.RunInfo) -> dict | None:
    """The run's newest eval.json entry (a damaged file shows as no score; its error is the run's)."""
    if not info.readable:
        return None
    try:
        entries = runs.read_eval(info.path)
    except runs.RunError:
        return None
    return entries[-1] if entries else None


def runs_table(infos: list[runs.RunInfo]) -> pd.DataFrame:
    """One row per run, the columns people look for first (status, score, steps, time, loss) on the left."""
    rows = []
    for info in infos:
        c = info.config
        cost = cache.network_cost(c.model, c.data.image_size) if c else None
        score = latest_score(info)
        rows.append({
            "run": info.name,
            "status": info.state,
            "Fréchet distance": score.get("fd") if score else None,
            "steps": info.step if c else None,
            "training time": format_duration(training_seconds(info)) if c else "—",
            "last loss": info.last_loss,
            "model": MODEL_LABELS.get(c.model.name, c.model.name) if c else "—",
            "optimizer": OPTIMIZER_LABELS.get(c.train.optimizer, c.train.optimizer) if c else "—",
            "scored at": f"{score.get('setting')}, N = {score.get('n')}" if score else "",
            "dataset": data_source.data_label(c.data) if c else "—",
            "pixels": PIXEL_RANGE_LABELS.get(c.train.pixel_range, "—") if c else "—",
            "T": c.schedule.timesteps if c else None,
            "params (M)": cost["params"] / 1e6 if cost else None,
            "GFLOP/image": cost["forward_gflop"] if cost else None,
            "processes": info.meta.get("world_size", 1) if c else None,  # torchrun's world size
            "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.updated_at)) if info.updated_at else "",
            "error": info.error or (f"note: {info.fallback}" if info.fallback else ""),
        })
    table = pd.DataFrame(rows)
    return table.astype({"T": "Int64", "steps": "Int64"}) if rows else table


def _delete(name: str) -> None:
    try:
        runs.delete_run(runs_dir(), name)
    except (runs.RunError, ConfigError, OSError) as exc:
        st.session_state["runs_feedback"] = ("error", f"Not deleted: {exc}")
    else:
        st.session_state["runs_feedback"] = ("success", f"Deleted run **{name}**.")
    st.session_state.pop("runs_confirm", None)


def _resume(run_dir: str) -> None:
    try:
        job_manager().resume(Path(run_dir))
    except (JobBusy, runs.RunError, ConfigError) as exc:
        st.session_state["runs_feedback"] = ("warning", str(exc))
    else:
        st.session_state["runs_go_train"] = True


def actions_ui(info: runs.RunInfo) -> None:
    """Resume / download / delete for one run; delete asks first."""
    c1, c2, c3 = st.columns(3)
    can_resume = info.readable and info.state in runs.RESUMABLE_STATES
    c1.button("Resume training", icon=":material/play_arrow:", key="runs_resume", disabled=not can_resume,
              on_click=_resume, args=(str(info.path),),
              help="Stopped, interrupted and failed runs continue from their last checkpoint")
    c2.download_button("Download bundle (zip)", data=lambda: run_bundle(info.path, include_optimizer=True),
                       file_name=f"{info.name}.zip", mime="application/zip", icon=":material/download:",
                       on_click="ignore", key="runs_zip",
                       help="config, metrics, weights, optimizer state (so a stopped run resumes elsewhere), "
                            "evaluations and sample grids")
    if st.session_state.get("runs_confirm") == info.name:
        st.warning(f"Delete run **{info.name}** and every file in it? This cannot be undone.")
        d1, d2 = st.columns([3, 1])
        d1.button(f"Yes, delete {info.name}", icon=":material/delete_forever:", type="primary",
                  key="runs_delete_yes", on_click=_delete, args=(info.name,))
        d2.button("Cancel", key="runs_delete_no", on_click=lambda: st.session_state.pop("runs_confirm", None))
    else:
        c3.button("Delete…", icon=":material/delete:", key="runs_delete",
                  on_click=lambda: st.session_state.update(runs_confirm=info.name))


st.title("Runs")
st.caption(f"Every run folder in `{runs_dir()}`: its status, its last loss, and what to do with it. "
           "Runs trained from the command line (`python -m core train`) show up here too.")

if st.session_state.pop("runs_go_train", False):
    st.switch_page("views/train.py")

feedback = st.session_state.pop("runs_feedback", None)
if feedback:
    getattr(st, feedback[0])(feedback[1])

infos = runs.list_runs(runs_dir())
if not infos:
    st.info("No runs yet. Train one on the **Train** page.")
    st.stop()

table = runs_table(infos)
if not table["error"].any():
    table = table.drop(columns="error")  # no empty column pushing the others off the right edge
st.dataframe(table, hide_index=True, key="runs_table", width="stretch",
             column_config={"run": st.column_config.TextColumn(width="medium"),
                            "status": st.column_config.TextColumn(width="small"),
                            "Fréchet distance": st.column_config.NumberColumn(
                                format="%.2f", width="medium", help="the newest evaluation (lower is better); "
                                "compare runs only at the same setting and N ('scored at')"),
                            "training time": st.column_config.TextColumn(width="small"),
                            "last loss": st.column_config.NumberColumn(format="%.4f", width="small"),
                            "params (M)": st.column_config.NumberColumn(format="%.2f", width="small"),
                            "GFLOP/image": st.column_config.NumberColumn(format="%.2f", help="one forward pass",
                                                                         width="small"),
                            "T": st.column_config.NumberColumn(width="small"),
                            "steps": st.column_config.NumberColumn(width="small"),
                            "error": st.column_config.TextColumn(width="medium")})
if table["pixels"].nunique() > 1:
    st.caption(":material/info: **last loss** compares only between runs of the same pixel range and schedule: "
               "the ε-loss of a [0, 1] run reads lower than a [−1, 1] run's at equal quality (the book run's "
               "loss is lower while its Fréchet distance is far worse). Compare the *loss in x̂0 space* or the "
               "evaluations on the **Compare** page.")

by_name = {i.name: i for i in infos}
name = st.selectbox("Run", list(by_name), key="runs_pick",
                    format_func=lambda n: f"{n} ({by_name[n].state})")
chosen = by_name[name]
if chosen.error:
    st.error(chosen.error)
if chosen.fallback:  # a fallback is said out loud: the step shown is previous/'s
    st.warning(f"Run {chosen.name!r}: {chosen.fallback}")
actions_ui(chosen)

st.subheader("Evaluate")
if chosen.readable and chosen.config is not None and (chosen.path / "model.safetensors").exists():
    evaluate_ui(chosen, "runs")
else:
    st.caption("This run has no weights to evaluate yet.")
evaluation_status_ui("runs")
