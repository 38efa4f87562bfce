"""The Evaluate action shared by the Runs and Compare pages: pick a sampler, steps and N, see what it
will take, score the run in the background (`core.jobs.EvaluationJob`), watch its progress. Below
it, the memorization check (dashboard.memorization), whose job runs through the same manager and
shows its progress in the same status panel.

The job adds its entry to the run's eval.json, exactly as `python -m core eval` does.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from core.store import runs
from core.config import ConfigError, SampleConfig
from core.work import estimates
from core.work.jobs import JobBusy, classifier_ready
from dashboard import cache, reading
from dashboard.charts import format_duration
from dashboard.memorization import memorization_ui
from dashboard.widgets import sampler_setting_ui
from dashboard.state import evaluation_manager

POLL_S = 1.0
DEFAULT_N = 1000  # what `python -m core eval` uses: numbers compare only at the same N


def _start(run_dir: str, params: dict, prefix: str, kind: str = "fd") -> None:
    """Start an evaluation ("fd") or a memorization check ("nearest"); the page says which, or why not."""
    try:
        config = SampleConfig(sampler=params["sampler"], steps=params["steps"], n=params["n"], seed=0)
        evaluation_manager().start(Path(run_dir), config, kind=kind, device=cache.DEVICE)
    except (JobBusy, ConfigError, runs.RunError) as exc:
        st.session_state[f"{prefix}_eval_feedback"] = ("warning", str(exc))
    else:
        doing = f"Checking **{Path(run_dir).name}** for copies" if kind == "nearest" else \
            f"Evaluating **{Path(run_dir).name}**"
        st.session_state[f"{prefix}_eval_feedback"] = ("success", f"{doing} ({config.setting}, N = {config.n}).")


def evaluate_ui(info: runs.RunInfo, prefix: str) -> None:
    """Sampler, steps and N for one run, the time it will take, and the Evaluate button."""
    params = sampler_setting_ui(info, f"{prefix}_eval", DEFAULT_N, 100,
                                "Compare only figures taken at the same N (the CLI uses 1000)")
    sampler, n = params["sampler"], params["n"]
    ready = classifier_ready(info.config.data.dataset)
    sampling = cache.sampling_estimate(info, sampler, params["steps"], int(n))
    seconds = estimates.estimate_evaluation(sampling, int(n), ready).seconds
    note = "" if ready else " (including fitting the feature classifier once, about 3 minutes)"
    st.caption(f"Estimated time here: about **{format_duration(seconds)}**{note}. Runs in the background; "
               "the entry goes into the run's eval.json, as `python -m core eval` writes it.")
    busy = evaluation_manager().job is not None and evaluation_manager().job.alive
    st.button("Evaluate", icon=":material/speed:", key=f"{prefix}_eval_button", on_click=_start,
              args=(str(info.path), params, prefix), disabled=busy,
              help="One evaluation at a time" if busy else None)
    memorization_ui(info, prefix, _start)


def evaluation_status_ui(prefix: str) -> None:
    """The running (or last) evaluation: phase, progress, ETA, cancel; the figure once it is done."""
    feedback = st.session_state.pop(f"{prefix}_eval_feedback", None)
    if feedback:
        getattr(st, feedback[0])(feedback[1])
    manager = evaluation_manager()
    alive_at_full_run = manager.job is not None and manager.job.alive

    @st.fragment(run_every=POLL_S if alive_at_full_run else None)
    def panel() -> None:
        job = manager.job
        if job is None:
            return
        s = job.snapshot()
        if s.active:
            eta = f" · about {format_duration(s.eta_s)} left" if s.eta_s is not None else ""
            counted = f": {s.done} of {s.total}" if s.total else ""
            doing = "Checking for copies" if s.kind == "nearest" else "Evaluating"
            st.progress(s.fraction, text=f"{doing} **{s.run_name}** ({s.setting}) · {s.phase}{counted} · "
                                         f"{format_duration(s.elapsed_s)}{eta}")
            st.button("Cancel evaluation", icon=":material/close:", key=f"{prefix}_eval_cancel", on_click=job.cancel)
            return
        if alive_at_full_run:
            # Ended: a full run shows the result once and the new eval.json entry in the page's tables
            # (the thread outlives its last report by a moment: wait for it, so the rerun is not missed).
            job.join(5.0)
            st.rerun()
        if st.session_state.get(f"{prefix}_eval_shown") == id(job):
            return  # said once; a later action on the page clears it (the figure stays in the tables)
        st.session_state[f"{prefix}_eval_shown"] = id(job)
        what = "The check for copies" if s.kind == "nearest" else "Evaluation"
        if s.state == "finished" and s.entry and s.kind == "nearest":
            verdict = "copies its training images" if s.entry.get("copying") else "no sign of copying"
            st.success(f"Checked **{s.run_name}** for copies ({s.setting}, N = {s.entry['n']}): {verdict}, "
                       f"in {format_duration(s.elapsed_s)}.")
        elif s.state == "finished" and s.entry:
            verdict = reading.verdict(s.entry["fd"], s.entry.get("fd_floor"), s.entry.get("fd_noise"))
            st.success(f"Evaluated **{s.run_name}** ({s.setting}, N = {s.entry['n']}): Fréchet distance "
                       f"**{s.entry['fd']:.2f}** (real-data floor {s.entry['fd_floor']:.2f})"
                       + (f", {verdict}" if verdict else "") + f", in {format_duration(s.elapsed_s)}.")
        elif s.state == "failed":
            st.error(f"{what} of {s.run_name} failed: {s.error}")
        else:
            st.info(f"{what} of {s.run_name} cancelled.")

    panel()
