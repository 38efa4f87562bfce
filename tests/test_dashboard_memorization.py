"""Dashboard, the memorization check in the Evaluate panel: "Check for copies" runs a NearestCheckJob
through the EvaluationManager, then the run's latest verdict and its "sample | nearest training
image" grid show; a damaged grid or a damaged eval.json entry is one line of error, never a crash."""
from __future__ import annotations

import json
import time

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, copy_run, poll_app
from core.config import SampleConfig
from core.evaluation.nearest import check_run
from core.store import runs
from core.work.background import JobBusy
from core.work.evaluation_jobs import EvaluationManager, NearestCheckJob

pytestmark = pytest.mark.integration  # the held-out images are the real FashionMNIST test split

APP = str(REPO / "dashboard" / "app.py")
VERDICTS = ("copies its training images", "no sign of copying")


@pytest.fixture(scope="module")
def checked_run(trained_tiny_run, tmp_path_factory):
    """The tiny run, checked once (N = 16, 4 steps): its memorization entry and grid, to copy and damage."""
    run = copy_run(trained_tiny_run, tmp_path_factory.mktemp("checked"))
    check_run(run, SampleConfig(sampler="ddim", steps=4, n=16))
    return run


def runs_page(run_dir, monkeypatch) -> AppTest:
    monkeypatch.setenv("DDPM_RUNS_DIR", str(run_dir.parent))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/runs.py").run()
    assert not at.exception, at.exception
    return at


def images(at: AppTest) -> list:
    """The grids shown (by their caption: the page may show other images)."""
    return [img for img in at.image if any("its nearest training image" in c for c in img.captions)]


def test_the_job_runs_through_the_evaluation_manager(tiny_run):
    manager = EvaluationManager()
    job = manager.start(tiny_run, SampleConfig(sampler="ddim", steps=4, n=16), kind="nearest")
    assert isinstance(job, NearestCheckJob)
    with pytest.raises(JobBusy):  # one job at a time, of either kind (loading the data takes seconds)
        manager.start(tiny_run, SampleConfig(n=16))
    assert job.join(120), "the check did not finish in time"
    status = job.snapshot()
    assert status.state == "finished", status.error
    assert status.kind == "nearest" and status.setting == "nearest-ddim-4" and status.phase == "done"
    (entry,) = runs.read_eval(tiny_run)
    assert entry == status.entry and entry["kind"] == "memorization" and entry["n"] == 16
    assert (tiny_run / entry["grid"]).is_file()
    with pytest.raises(ValueError, match="evaluation kind = 'copies'"):
        manager.start(tiny_run, SampleConfig(n=16), kind="copies")


def test_check_for_copies_from_the_runs_page(tiny_run, monkeypatch):
    at = runs_page(tiny_run, monkeypatch)
    assert any(c.value.startswith("Estimated check time: about") and "--nearest" in c.value for c in at.caption)
    assert not images(at)  # no check yet: no result
    labels = [w.label for w in [*at.number_input, *at.selectbox]]
    assert len(labels) == len(set(labels)), labels  # beside Evaluate's row: each widget named once
    at.number_input(key="runs_mem_steps").set_value(4)
    at.number_input(key="runs_mem_n").set_value(16).run()
    at.button(key="runs_mem_button").click().run()
    assert any("Checking **tiny** for copies" in s.value for s in at.success)
    poll_app(at, lambda: any("Checked **tiny** for copies" in s.value for s in at.success), "the check")
    (entry,) = json.loads((tiny_run / "eval.json").read_text())
    assert entry["kind"] == "memorization" and entry["n"] == 16
    verdict = VERDICTS[0] if entry["copying"] else VERDICTS[1]
    text = " ".join(m.value for m in at.markdown)
    assert f"**{verdict}**" in text and f"{entry['near_copy_share']:.0%}" in text
    assert f"{entry['pixels_sample_nearest_median']:.3f}" in text
    assert any(c.value.startswith("Criterion: a sample is a near-copy when d1 <") for c in at.caption)
    assert len(images(at)) == 1
    assert not at.exception and not at.error


def _damage_grid(run):
    (entry,) = runs.read_eval(run)
    (run / entry["grid"]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"torn" * 10)


def _grid_is_a_link(run):
    (entry,) = runs.read_eval(run)
    grid = run / entry["grid"]
    grid.unlink()
    grid.symlink_to(run / "config.json")


def _grid_is_missing(run):
    (entry,) = runs.read_eval(run)
    (run / entry["grid"]).unlink()


def _edit_entry(**changes):
    def edit(run):
        (entry,) = runs.read_eval(run)
        (run / "eval.json").write_text(json.dumps([{**entry, **changes}]))
    return edit


def _eval_json_torn(run):
    text = (run / "eval.json").read_text()
    (run / "eval.json").write_text(text[: len(text) // 2])


@pytest.mark.parametrize("damage, message", [
    (_damage_grid, "is not a readable PNG"),
    (_grid_is_a_link, "is a symbolic link"),
    (_grid_is_missing, "is missing"),
    (_edit_entry(near_copy_share="lots"), "near_copy_share = 'lots' is not a number"),
    (_edit_entry(pixels_sample_nearest_median=1.5), "pixels_sample_nearest_median = 1.5"),
    (_edit_entry(copying="yes"), "copying = 'yes' is not true or false"),
    (_edit_entry(grid="../../config.json"), "is not a samples/nearest-*.png file"),
    (_edit_entry(grid="samples/../../../etc/passwd.png"), "is not a samples/nearest-*.png file"),
    (_eval_json_torn, "eval.json"),
], ids=["torn-png", "symlink", "missing", "share-text", "distance-range", "copying-text", "grid-outside",
        "grid-traversal", "eval-json-torn"])
def test_a_damaged_result_is_one_line_of_error(checked_run, tmp_path, monkeypatch, damage, message):
    run = copy_run(checked_run, tmp_path / "runs")
    damage(run)
    at = runs_page(run, monkeypatch)
    errors = [e.value for e in at.error if message in e.value]
    assert len(errors) == 1 and "\n" not in errors[0], [e.value for e in at.error]
    assert not images(at)


def test_the_check_can_be_cancelled(tiny_run):
    job = NearestCheckJob(tiny_run, SampleConfig(sampler="ddpm", n=2000, batch_size=2)).start()
    deadline = time.monotonic() + 60
    while job.snapshot().phase != "sampling":
        assert time.monotonic() < deadline and job.alive, job.snapshot().error
        time.sleep(0.05)
    job.cancel()
    assert job.join(60)
    assert job.snapshot().state == "cancelled" and runs.read_eval(tiny_run) == []
    assert not list((tiny_run / "samples").glob("nearest-*.png"))
