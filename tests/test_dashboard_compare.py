"""Dashboard, Compare page: overlaid loss curves (smoothing, x-axis, log scale), the settings that
differ, evaluations, loss per timestep bucket, samples from one seed, and the CSV of the curves."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, make_tiny_images, tiny_config
from core import runs
from core.training import train_run
from core.evaluation.frechet import QualityReport
from dashboard.charts import metrics_frame

pytestmark = pytest.mark.integration  # the timestep buckets are scored on real FashionMNIST test images

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """A tiny AdamW run (with EMA and an evaluation) and an Adam twin, a damaged folder beside them.

    Trained once for the module: the tests only read them.
    """
    runs_dir = tmp_path_factory.mktemp("compare") / "runs"
    images = make_tiny_images()
    adamw = runs.create_run(runs_dir, "tiny", tiny_config(ema_decay=0.9))
    train_run(adamw, images=images)
    adam = runs.create_run(runs_dir, "adam", tiny_config(optimizer="adam"))
    train_run(adam, images=images)
    # An entry as `python -m core eval` writes it: the report's own keys, then the run's.
    report = QualityReport(n=64, fd=123.4, fd_floor=3.2, fd_noise=150.0,
                           class_shares={"Trouser": 0.5, "Bag": 0.5}, class_entropy=0.3, mean_confidence=0.8)
    runs.append_eval(adamw, {"setting": "ddim-50", "sampler": "ddim", "steps": 50, "seconds": 12.5,
                             **report.to_dict()})
    (runs_dir / "broken").mkdir()
    (runs_dir / "broken" / "config.json").write_text("[1, 2")
    return adamw, adam


@pytest.fixture
def two_runs(trained_pair, monkeypatch):
    monkeypatch.setenv("DDPM_RUNS_DIR", str(trained_pair[0].parent))
    return trained_pair


def compare_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/compare.py").run()
    assert not at.exception
    return at


def figure(at: AppTest, index: int = 0) -> dict:
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def values(array) -> list[float]:
    """A trace's x or y: plotly 6 sends numpy arrays as {"dtype", "bdata": base64}."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def test_loss_curves_overlay_with_smoothing_axes_and_log_scale(two_runs):
    tiny, adam = two_runs
    at = compare_page()
    assert sorted(at.multiselect(key="cmp_runs").value) == ["adam", "tiny"]  # the damaged one is not offered
    traces = [t for t in figure(at)["data"] if t.get("showlegend") is not False]
    assert sorted(t["name"] for t in traces) == ["ImprovedUNet + Adam · adam", "ImprovedUNet + AdamW · tiny"]
    assert len({t["line"]["color"] for t in traces}) == 2
    assert figure(at)["layout"]["yaxis"]["type"] == "log"

    at.slider(key="cmp_smooth").set_value(0.0).run()  # no smoothing: the line is metrics.csv itself
    raw = {r["step"]: r["loss"] for r in runs.read_metrics(adam)}
    adam_trace = next(t for t in figure(at)["data"] if t["name"] == "ImprovedUNet + Adam · adam")
    assert values(adam_trace["x"]) == list(raw) and np.allclose(values(adam_trace["y"]), list(raw.values()))

    at.radio(key="cmp_x").set_value("wall-clock").run()
    at.toggle(key="cmp_log").set_value(False).run()
    layout = figure(at)["layout"]
    assert layout["xaxis"]["title"]["text"] == "wall-clock minutes" and layout["yaxis"].get("type") != "log"

    at.multiselect(key="cmp_runs").set_value(["adam"]).run()
    assert {t["name"] for t in figure(at)["data"] if t.get("showlegend") is not False} == \
        {"ImprovedUNet + Adam · adam"}


def test_settings_that_differ_and_evaluations(two_runs):
    at = compare_page()
    diff = at.dataframe[0].value
    assert "train.optimizer" in diff.index and "train.ema_decay" in diff.index
    assert "schedule.timesteps" not in diff.index and "model.name" not in diff.index
    assert diff.loc["train.optimizer"].to_dict() == {"adam": "adam", "tiny": "adamw"}
    evals = at.dataframe[1].value
    row = evals.iloc[0]
    assert row["run"] == "tiny" and row["fd"] == 123.4 and row["fd_ratio"] == round(123.4 / 3.2, 4)
    assert row["class_shares.Trouser"] == 0.5
    # headline figures first, in this order, then the rest (seconds, ...), the class shares last
    assert list(evals.columns[:9]) == ["run", "setting", "n", "fd", "fd_floor", "fd_ratio", "fd_noise",
                                       "class_entropy", "mean_confidence"]
    assert evals.columns[-1].startswith("class_shares.") and "seconds" in evals.columns[9:]
    shares = figure(at, 1)["data"]  # after the loss curves: the class shares of the evaluation
    assert [t["type"] for t in shares] == ["bar"] and list(shares[0]["x"]) == ["Trouser", "Bag"]


def test_csv_of_the_overlaid_curves(two_runs):
    at = compare_page()
    assert [b.label for b in at.get("download_button")] == ["Metrics as CSV"]
    infos = {i.name: i for i in runs.list_runs(two_runs[0].parent) if i.readable}
    table = metrics_frame([(infos[n], runs.read_metrics(infos[n].path)) for n in ("tiny", "adam")], 0.6)
    back = pd.read_csv(io.StringIO(table.to_csv(index=False)))
    assert set(back["run"]) == {"tiny", "adam"}
    assert len(back) == len(runs.read_metrics(two_runs[0])) + len(runs.read_metrics(two_runs[1]))
    assert {"step", "epoch", "loss", "loss_smoothed", "elapsed_s"} <= set(back.columns)


def test_loss_per_timestep_and_samples_from_one_seed(two_runs):
    at = compare_page()
    captions = [img.captions for img in at.image]
    assert captions == [["ImprovedUNet + Adam · adam"], ["ImprovedUNet + AdamW · tiny"]] or \
        captions == [["ImprovedUNet + AdamW · tiny"], ["ImprovedUNet + Adam · adam"]]
    at.button(key="cmp_buckets_button").click().run()
    assert not at.exception
    buckets = figure(at, 2)["data"]  # loss curves, class shares, then the buckets
    assert len(buckets) == 2 and all(len(values(t["y"])) == 10 for t in buckets)
    assert all(y > 0 for t in buckets for y in values(t["y"]))
    at.run()  # the bucket chart stays (cached) on later runs of the page
    assert len(at.get("plotly_chart")) == 3


def test_smoothing_and_epoch_position():
    from core.config import override
    from dashboard.charts import epoch_position, smooth

    assert np.allclose(smooth([3.0] * 5, 0.9), 3.0)  # debiased: a constant stays constant from the start
    assert list(smooth([1.0, 2.0], 0.0)) == [1.0, 2.0]
    assert smooth([1.0, 0.0], 0.5)[1] == pytest.approx(1 / 3)  # (0.5·0.5·1 + 0.5·0) / (1 − 0.25)
    # 512 images, batch 32: 16 steps per epoch; rows logged at steps 8, 16, 24 sit at 0.5, 1.0, 1.5.
    config = override(tiny_config(), limit_images=512)
    rows = pd.DataFrame({"step": [8, 16, 24], "epoch": [1, 1, 2]})
    assert list(epoch_position(rows, config)) == [0.5, 1.0, 1.5]
    # Epochs that disagree with the config (a run fed other images) keep their whole numbers.
    assert list(epoch_position(pd.DataFrame({"step": [8, 16], "epoch": [1, 2]}), config)) == [1.0, 2.0]
