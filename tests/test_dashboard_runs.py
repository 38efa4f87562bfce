"""Dashboard, Runs page: every run in one table (damaged ones with their error), delete after a
confirmation, the zip bundle, and resume of a stopped run."""
from __future__ import annotations

import io
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, tiny_config
from core.store import runs
from core.store.export import run_bundle
from core.work.jobs import JobManager
from dashboard.state import job_manager

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def runs_dir(tiny_run, monkeypatch):
    """The finished tiny run, a folder with broken JSON, and a folder with no config at all."""
    root = tiny_run.parent
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{oops")
    (root / "empty").mkdir()
    monkeypatch.setenv("DDPM_RUNS_DIR", str(root))
    return root


def runs_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/runs.py").run()
    assert not at.exception
    return at


def test_table_lists_every_run_and_damage_never_breaks_the_page(runs_dir):
    at = runs_page()
    table = at.dataframe[0].value.set_index("run")
    assert set(table.index) == {"tiny", "broken", "empty"}
    tiny = table.loc["tiny"]
    assert (tiny["status"], tiny["model"], tiny["optimizer"], tiny["dataset"], tiny["steps"]) == \
        ("finished", "ImprovedUNet", "AdamW", "FashionMNIST", 6)
    assert tiny["last loss"] == pytest.approx(runs.run_info(runs_dir / "tiny").last_loss)
    # what an ML user looks for: network size and cost, training time, the pixel range
    assert 0.01 < tiny["params (M)"] < 1 and tiny["GFLOP/image"] > 0 and tiny["pixels"] == "[-1, 1]"
    assert tiny["training time"] not in ("", "—")
    assert table.loc["broken", "status"] == "damaged" and "not valid JSON" in table.loc["broken", "error"]
    assert "config.json is missing" in table.loc["empty", "error"]

    at.selectbox(key="runs_pick").set_value("broken").run()
    assert "not valid JSON" in at.error[0].value
    assert at.button(key="runs_resume").proto.disabled  # nothing to resume from


def test_delete_asks_first(runs_dir):
    at = runs_page()
    at.selectbox(key="runs_pick").set_value("broken").run()
    at.button(key="runs_delete").click().run()
    assert "cannot be undone" in at.warning[0].value
    at.button(key="runs_delete_no").click().run()  # cancel: nothing happens
    assert (runs_dir / "broken").is_dir() and not at.warning
    at.button(key="runs_delete").click().run()
    at.button(key="runs_delete_yes").click().run()
    assert not (runs_dir / "broken").exists()
    assert "Deleted run **broken**" in at.success[0].value
    assert "broken" not in set(at.dataframe[0].value["run"])


def test_bundle_is_a_zip_of_the_run(runs_dir):
    at = runs_page()
    at.selectbox(key="runs_pick").set_value("tiny").run()
    assert [b.label for b in at.get("download_button")] == ["Download bundle (zip)"]
    assert "optimizer state" in at.get("download_button")[0].help
    data = run_bundle(runs_dir / "tiny", include_optimizer=True)  # what the button serves when clicked
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
        assert {"tiny/config.json", "tiny/metrics.csv", "tiny/model.safetensors", "tiny/ema.safetensors",
                "tiny/optimizer.safetensors"} <= names  # resumable where it is unpacked
        assert runs.RunConfig.from_json(zf.read("tiny/config.json").decode()) == runs.load_config(runs_dir / "tiny")


@pytest.mark.integration  # the resumed job loads the real FashionMNIST training split
def test_resume_a_stopped_run_opens_the_train_page(runs_dir, tiny_images):
    job = JobManager().start_new(runs_dir, "stopped-one", tiny_config(max_steps=100_000, epochs=1000),
                                 images=tiny_images)
    while job.alive and job.snapshot().step < 2:
        job.join(0.05)
    job.stop()
    assert job.join(60)
    at = runs_page()
    at.selectbox(key="runs_pick").set_value("stopped-one").run()
    at.button(key="runs_resume").click().run()
    manager = job_manager()
    try:
        assert manager.job is not None and manager.job.run_dir == runs_dir / "stopped-one"
        assert at.title[0].value == "Train"  # switched to the page that shows the running job
    finally:
        manager.stop()
        assert manager.job.join(120)
    assert runs.run_info(runs_dir / "stopped-one").state == "stopped"
