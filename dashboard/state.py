"""Where the dashboard finds its runs, and the one process-wide training-job manager.

`runs_dir()` reads `DDPM_RUNS_DIR` at every call (tests point it at a temporary folder after the
app module was imported). The `JobManager` lives in `st.cache_resource`, so every session of this
server process (a reload, a second tab) sees the same running job; it guards itself with a lock.
"""
from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from core.work.jobs import EvaluationManager, JobManager

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_RUNS_DIR = "DDPM_RUNS_DIR"


def runs_dir() -> Path:
    """`$DDPM_RUNS_DIR`, else the repository's checkpoints/ (whatever the server's working folder)."""
    value = os.environ.get(ENV_RUNS_DIR)
    return Path(value) if value else REPO_ROOT / "checkpoints"


@st.cache_resource
def job_manager() -> JobManager:
    return JobManager()


@st.cache_resource
def evaluation_manager() -> EvaluationManager:
    """One evaluation at a time per server process, seen by every page and tab."""
    return EvaluationManager()


@st.cache_resource
def form_memory() -> dict:
    """The Train form's last preset and values in this server process: a reload or a second tab
    starts from them instead of the default preset."""
    return {}
