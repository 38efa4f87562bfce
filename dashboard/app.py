"""The diffusion workbench dashboard: `streamlit run dashboard/app.py`.

Routes to one page per view with `st.navigation`. The pages are thin: widgets in `*_ui()`
functions, work in `core` and in the cached helpers of `dashboard/cache.py`.
"""
from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts dashboard/ on sys.path, not the repository root.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import streamlit as st  # noqa: E402

from dashboard.state import job_manager  # noqa: E402

VIEWS = Path(__file__).parent / "views"

st.set_page_config(page_title="Diffusion workbench", page_icon=":material/blur_on:", layout="wide")

# Streamlit reads .streamlit/config.toml from the working folder only: started elsewhere, the app would
# listen on every interface without XSRF protection. Refuse to serve rather than silently drop both.
if not st.get_option("server.address") or not st.get_option("server.enableXsrfProtection"):
    st.error(f"The dashboard was started outside {REPO_ROOT}, so its .streamlit/config.toml (127.0.0.1 only, XSRF "
             f"protection) was not read. Start it from there: cd {REPO_ROOT} && make run (or pass "
             "--server.address 127.0.0.1 to put it on this machine only).")
    st.stop()

pages = [
    st.Page(VIEWS / "forward.py", title="Forward process", icon=":material/blur_on:", url_path="forward", default=True),
    st.Page(VIEWS / "train.py", title="Train", icon=":material/model_training:", url_path="train"),
    st.Page(VIEWS / "compare.py", title="Compare", icon=":material/stacked_line_chart:", url_path="compare"),
    st.Page(VIEWS / "reverse.py", title="Reverse process", icon=":material/movie:", url_path="reverse"),
    st.Page(VIEWS / "experiments.py", title="Experiments", icon=":material/science:", url_path="experiments"),
    st.Page(VIEWS / "runs.py", title="Runs", icon=":material/folder_open:", url_path="runs"),
]
page = st.navigation(pages)

with st.sidebar:
    st.caption("Step 9 of *Deep Learning from Scratch 5*: a DDPM on 28×28 images (or your own), the book's UNet "
               "versus an ImprovedUNet, Adam versus AdamW.")
    job = job_manager().job
    if job is not None and job.alive and job.snapshot().active:
        st.info(f"Training **{job.run_dir.name}** in the background; its progress is on the Train page.",
                icon=":material/model_training:")
    queued = job_manager().queue_runner
    training = queued.training_run if queued is not None else None
    if training is not None:
        st.info(f"The queue is training **{training}**; the queue and its progress are on the Train page.",
                icon=":material/queue:")

page.run()
