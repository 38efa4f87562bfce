"""Runs: every run folder in one table, with resume, a zip download, and delete (after a confirmation).

Damaged folders are listed with the reason they cannot be read; nothing about them can break the page.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from core import runs
from core.config import MODEL_LABELS, OPTIMIZER_LABELS, ConfigError
from core.export import run_bundle
from core.jobs import JobBusy
from dashboard.state import job_manager, runs_dir



def runs_table(infos: list[runs.RunInfo]) -> pd.DataFrame:
    rows = []
    for info in infos:
        c = info.config
        rows.append({
            "run": info.name,
            "status": info.state,
            "model": MODEL_LABELS.get(c.model.name, c.model.name) if c else "—",
            "optimizer": OPTIMIZER_LABELS.get(c.train.optimizer, c.train.optimizer) if c else "—",
            "dataset": c.train.dataset if c else "—",
            "T": c.schedule.timesteps if c else None,
            "steps": info.step if c else None,
            "processes": info.meta.get("world_size", 1) if c else None,  # torchrun's world size
            "last loss": info.last_loss,
            "updated": time.strftime("%Y-%m-%d %H:%M", time.localtime(info.updated_at)) if info.updated_at else "",
            "error": info.error or "",
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
    c2.download_button("Download bundle (zip)", data=lambda: run_bundle(info.path), file_name=f"{info.name}.zip",
                       mime="application/zip", icon=":material/download:", on_click="ignore", key="runs_zip",
                       help="config, metrics, weights, evaluations and sample grids")
    if st.session_state.get("runs_confirm") == info.name:
        st.warning(f"Delete run **{info.name}** and every file in it? This cannot be undone.")
        d1, d2, _ = st.columns([1, 1, 4])
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

st.dataframe(runs_table(infos), hide_index=True, key="runs_table",
             column_config={"last loss": st.column_config.NumberColumn(format="%.4f"),
                            "error": st.column_config.TextColumn(width="large")})

by_name = {i.name: i for i in infos}
name = st.selectbox("Run", list(by_name), key="runs_pick",
                    format_func=lambda n: f"{n} ({by_name[n].state})")
chosen = by_name[name]
if chosen.error:
    st.error(chosen.error)
actions_ui(chosen)
