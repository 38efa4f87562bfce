"""Dashboard, the Evaluate action (Runs and Compare pages): a background EvaluationJob with a time
estimate, progress, and the entry in eval.json that Compare then shows."""
from __future__ import annotations

import json
import time

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, poll_app
from core.config import DEFAULT_FEW_STEP_SAMPLER, SAMPLER_LABELS
from core.store import runs
from core.config import SampleConfig
from core.data.datasets import load_images
from core.evaluation import classifier as clf
from core.work.jobs import EvaluationJob, classifier_ready

pytestmark = pytest.mark.integration  # scored against the real FashionMNIST test split

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A classifier fitted for a handful of steps: the same code path, seconds instead of minutes."""
    folder = tmp_path_factory.mktemp("classifiers")
    fitted = clf.fit(load_images("fashion_mnist", "train"), load_images("fashion_mnist", "test"),
                     clf.FitConfig(epochs=1, batch_size=64, max_steps=10))
    clf.save_classifier(fitted, clf.classifier_path("fashion_mnist", folder))
    return folder


def wait(job: EvaluationJob, timeout: float = 120.0) -> None:
    assert job.join(timeout), "evaluation did not finish in time"


def test_evaluation_job_writes_an_entry_like_the_cli(tiny_run, classifier_dir):
    config = SampleConfig(sampler="dpmpp2m", steps=4, n=16)
    job = EvaluationJob(tiny_run, config, classifier_dir=classifier_dir).start()
    wait(job)
    status = job.snapshot()
    assert status.state == "finished", status.error
    assert status.setting == "dpmpp2m-4" and status.entry["n"] == 16
    (entry,) = runs.read_eval(tiny_run)
    assert entry == status.entry
    for key in ("fd", "fd_floor", "fd_noise", "sampler", "steps", "nfe", "classifier_sha256", "seconds"):
        assert key in entry
    assert entry["sampler"] == "dpmpp2m" and entry["nfe"] == 4 and entry["weights"] == "ema"


def test_evaluation_job_can_be_cancelled(tiny_run, classifier_dir):
    job = EvaluationJob(tiny_run, SampleConfig(sampler="ddpm", n=2000, batch_size=2),
                        classifier_dir=classifier_dir).start()
    deadline = time.monotonic() + 60
    while job.snapshot().phase != "sampling":
        assert time.monotonic() < deadline and job.alive, job.snapshot().error
        time.sleep(0.05)
    job.cancel()
    wait(job)
    assert job.snapshot().state == "cancelled" and runs.read_eval(tiny_run) == []


def test_a_missing_classifier_is_reported(tmp_path):
    assert not classifier_ready("fashion_mnist", tmp_path)


def test_evaluate_from_the_runs_page_then_see_it_on_compare(tiny_run, classifier_dir, monkeypatch):
    monkeypatch.setenv("DDPM_RUNS_DIR", str(tiny_run.parent))
    monkeypatch.setenv(clf.ENV_CLASSIFIER_DIR, str(classifier_dir))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/runs.py").run()
    assert not at.exception
    assert at.selectbox(key="runs_eval_sampler").value == DEFAULT_FEW_STEP_SAMPLER
    assert at.number_input(key="runs_eval_steps").value == 20  # T = 20: the default fits
    assert any(c.value.startswith("Estimated time here: about") for c in at.caption)
    at.number_input(key="runs_eval_steps").set_value(5)
    at.number_input(key="runs_eval_n").set_value(32).run()
    at.button(key="runs_eval_button").click().run()
    assert any("Evaluating **tiny**" in s.value for s in at.success)
    poll_app(at, lambda: any("Fréchet distance" in s.value for s in at.success), "the evaluation")
    (entry,) = json.loads((tiny_run / "eval.json").read_text())
    assert entry["setting"] == f"{DEFAULT_FEW_STEP_SAMPLER}-5" and entry["n"] == 32

    at.switch_page("views/compare.py").run()
    assert not at.exception
    spec = json.loads(next(c for c in at.get("plotly_chart") if c.proto.id.endswith("cmp_quality_chart")).proto.spec)
    (line,) = spec["data"]
    assert line["name"] == f"tiny · {SAMPLER_LABELS[DEFAULT_FEW_STEP_SAMPLER]}" and line["y"][0] == pytest.approx(entry["fd"])
