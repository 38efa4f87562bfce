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

from conftest import REPO, copy_run, tiny_config
from core.config import DEFAULT_FEW_STEP_SAMPLER
from core.store import runs
from core.evaluation.frechet import QualityReport
from dashboard.charts import metrics_frame

pytestmark = pytest.mark.integration  # the timestep buckets are scored on real FashionMNIST test images

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, trained_runs):
    """A tiny AdamW run (with EMA and an evaluation) and an Adam twin, a damaged folder beside them.

    Trained once for the session (conftest's trained_runs), copied for the module: the tests only read them.
    """
    runs_dir = tmp_path_factory.mktemp("compare") / "runs"
    adamw = copy_run(trained_runs(tiny_config(ema_decay=0.9), "tiny"), runs_dir, "tiny")
    adam = copy_run(trained_runs(tiny_config(optimizer="adam"), "adam"), runs_dir, "adam")
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


def figure(at: AppTest, index: int | str = 0) -> dict:
    """A plotly chart's spec, by position or by the chart's key (e.g. "cmp_quality_chart")."""
    charts = at.get("plotly_chart")
    if isinstance(index, str):
        matching = [c for c in charts if c.proto.id.endswith(index)]
        assert matching, f"no chart {index!r} among {[c.proto.id for c in charts]}"
        return json.loads(matching[0].proto.spec)
    return json.loads(charts[index].proto.spec)


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
    # Adam and AdamW at 6 tiny steps lie within 3 % of each other: the second is dashed and marked,
    # so the first stays visible under it (issue 22, point 4).
    assert sorted((t["line"].get("dash", "solid"), t["mode"]) for t in traces) == [
        ("dash", "lines+markers"), ("solid", "lines")]
    layout = figure(at)["layout"]
    assert layout["yaxis"]["type"] == "log" and "1" in layout["yaxis"]["ticktext"]  # plain ticks, no 1.0e+2

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
    headline = at.dataframe[1].value  # the figures people compare, narrow enough to fit the page
    assert list(headline.columns) == ["run", "setting", "n", "classifier", "fd", "fd_ratio", "verdict", "fd_floor",
                                      "class_entropy", "seconds"]
    evals = at.dataframe[2].value  # every field, in the expander
    row = evals.iloc[0]
    assert row["run"] == "tiny" and row["fd"] == 123.4 and row["fd_ratio"] == round(123.4 / 3.2, 4)
    assert row["class_shares.Trouser"] == 0.5
    # headline figures first, in this order, then the rest (seconds, ...), the class shares last
    assert list(evals.columns[:11]) == ["run", "setting", "n", "classifier", "fd", "fd_floor", "verdict", "fd_ratio",
                                        "fd_noise", "class_entropy", "mean_confidence"]
    assert evals.columns[-1].startswith("class_shares.") and "seconds" in evals.columns[11:]
    shares = figure(at, "cmp_shares_chart")["data"]  # the class shares of the evaluation
    # one heatmap row per evaluation, one column per class, the share written in the cell
    assert [t["type"] for t in shares] == ["heatmap"] and list(shares[0]["x"]) == ["Trouser", "Bag"]
    assert shares[0]["text"][0][0] == "50%"


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
    buckets = figure(at, "cmp_bucket_chart")["data"]
    assert len(buckets) == 2 and all(len(values(t["y"])) == 10 for t in buckets)
    assert all(y > 0 for t in buckets for y in values(t["y"]))
    assert figure(at, "cmp_bucket_chart")["layout"]["yaxis"]["title"]["text"] == "MSE of x̂0 ([0, 1] pixels)"
    at.run()  # the bucket chart stays (cached) on later runs of the page
    assert figure(at, "cmp_bucket_chart")["data"] == buckets
    at.radio(key="cmp_bucket_space").set_value("eps").run()  # the training loss, per bucket
    eps = figure(at, "cmp_bucket_chart")
    assert eps["layout"]["yaxis"]["title"]["text"] == "MSE of ε" and values(eps["data"][0]["y"]) != \
        values(buckets[0]["y"])


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


def test_colours_stay_with_their_run_and_short_runs_can_share_an_axis(two_runs):
    at = compare_page()
    colour = {t["name"].split(" · ")[-1]: t["line"]["color"] for t in figure(at, "cmp_loss_chart")["data"]
              if t.get("showlegend") is not False}
    at.multiselect(key="cmp_runs").set_value(["tiny"]).run()  # tiny alone keeps its colour
    (only,) = [t for t in figure(at, "cmp_loss_chart")["data"] if t.get("showlegend") is not False]
    assert only["line"]["color"] == colour["tiny"]
    at.multiselect(key="cmp_runs").set_value(["adam", "tiny"]).run()
    again = {t["name"].split(" · ")[-1]: t["line"]["color"] for t in figure(at, "cmp_loss_chart")["data"]
             if t.get("showlegend") is not False}
    assert again == colour
    at.radio(key="cmp_x").set_value("fraction of run").run()
    spec = figure(at, "cmp_loss_chart")
    assert spec["layout"]["xaxis"]["title"]["text"] == "fraction of the run"
    assert all(max(values(t["x"])) == 1.0 for t in spec["data"])


def test_identical_curves_are_dashed_and_mixed_pixel_ranges_are_marked():
    from dashboard.charts import assign_colours, loss_figure

    rows = [{"step": s, "epoch": 1, "loss": 1.0 / s, "lr": 1e-3, "elapsed_s": s, "images_per_s": 1.0}
            for s in (1, 2, 3)]
    frames = []
    for run, regime in (("a", "pixels [0, 1] · linear T = 1000"), ("b", "pixels [-1, 1] · linear T = 1000")):
        df = pd.DataFrame(rows)
        df["run"], df["label"], df["regime"] = run, f"UNet · {run}", regime
        df["loss_smoothed"], df["run_fraction"] = df["loss"], df["step"] / 3
        frames.append(df)
    fig = loss_figure(pd.concat(frames), show_raw=False).to_dict()
    dashes = [t["line"]["dash"] for t in fig["data"]]
    assert dashes == ["solid", "dash"]  # the second of two identical curves is dashed
    assert all("[pixels" in t["name"] for t in fig["data"])  # mixed pixel ranges: the legend says which
    colours = assign_colours(["x", "y"])
    assert assign_colours(["y", "z"], colours)["y"] == colours["y"] and len(set(
        assign_colours(["x", "y", "z"], colours).values())) == 3


def test_steps_versus_quality_groups_by_n_and_classifier():
    from dashboard.charts import quality_groups, steps_quality_figure

    def entry(sampler, steps, fd, n=64, sha="abc"):
        return {"sampler": sampler, "steps": steps, "nfe": steps, "fd": fd, "n": n, "classifier_sha256": sha,
                "setting": f"{sampler}-{steps}"}

    evals = {"r1": [entry("ddpm", 1000, 5.0), entry("dpmpp2m", 10, 9.0), entry("dpmpp2m", 20, 7.0),
                    entry("ddim", 20, 8.0), entry("ddim", 50, 6.0, n=1000)],
             "r2": [entry("dpmpp2m", 20, 4.0, sha="other")]}
    groups = quality_groups(evals)
    assert list(groups)[0] == (64, "abc") and set(groups) == {(64, "abc"), (1000, "abc"), (64, "other")}
    evals["r2"][0]["finished_at"] = "2026-01-01T00:00:00"  # the latest evaluation's group comes first
    assert list(quality_groups(evals))[0] == (64, "other")
    fig = steps_quality_figure(groups[(64, "abc")]).to_dict()
    lines = {t["name"]: t for t in fig["data"]}
    assert list(lines["r1 · DPM-Solver++(2M)"]["x"]) == [10, 20] and list(lines["r1 · DPM-Solver++(2M)"]["y"]) == [9, 7]
    assert list(lines["r1 · DDIM"]["y"]) == [8.0]  # the N = 1000 entry is not on the N = 64 chart
    assert "r1 · DDPM (all T steps)" in lines
    (hline,) = fig["layout"]["shapes"]
    assert hline["y0"] == hline["y1"] == 5.0 and hline["line"]["dash"] == "dash"


def test_same_seed_samples_offer_every_sampler(two_runs):
    at = compare_page()
    assert at.selectbox(key="cmp_samples_sampler").value == DEFAULT_FEW_STEP_SAMPLER
    assert at.number_input(key="cmp_samples_steps").value == 20
    first = [img.proto.imgs[0].url for img in at.image]
    at.selectbox(key="cmp_samples_sampler").set_value("ddim")
    at.number_input(key="cmp_samples_steps").set_value(5).run()
    assert not at.exception and len(at.image) == 2
    assert any("DDIM, 5 steps" in c.value for c in at.caption)
    assert [img.proto.imgs[0].url for img in at.image] != first


def test_settings_show_only_fields_a_model_uses():
    from core.config import PRESETS
    from dashboard.charts import config_diff

    diff = config_diff({"book": PRESETS["book"], "improved": PRESETS["improved"]})
    assert diff.loc["model.attention"].to_dict() == {"book": "not used", "improved": "True"}
