"""Dashboard, Experiments page: a sweep's results table, the Fréchet distance per run labelled with
its change, overlaid loss curves and downloads; the form plans a sweep and queues its runs, and a bad
definition or a damaged sweep file is reported with nothing created or changed."""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, make_tiny_images, stop_queue_worker
from core.work import queue, sweeps
from core.store import runs
from core.evaluation.frechet import QualityReport
from core.train.training import train_run

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def runs_dir(tmp_path, monkeypatch):
    path = tmp_path / "runs"
    monkeypatch.setenv("DDPM_RUNS_DIR", str(path))
    yield path
    stop_queue_worker()


def trained_sweep(runs_dir) -> sweeps.Sweep:
    """A two-step path on tiny data, trained, the second run scored (an entry as the scorer writes it)."""
    sweep = sweeps.plan("abl", "tiny", sweeps.Budget("steps", 6), mode="path",
                        factors=[sweeps.parse_factor("ema_decay=0.9")], evaluation=sweeps.default_evaluation(64))
    sweeps.create(runs_dir, sweep)
    images = make_tiny_images()
    for run in sweep.runs:
        train_run(runs_dir / run.name, images=images)
    report = QualityReport(n=64, fd=40.5, fd_floor=12.5, fd_noise=300.0, class_shares={"Bag": 1.0},
                           class_entropy=0.0, mean_confidence=0.9)
    runs.append_eval(runs_dir / sweep.runs[1].name, {"setting": "dpmpp2m-sde-20", "sampler": "dpmpp2m-sde",
                                                     "steps": 20, **report.to_dict()})
    sweeps.write_results(runs_dir, "abl")
    return sweep


def experiments_page() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.switch_page("views/experiments.py").run()
    assert not at.exception
    return at


def test_a_sweep_shows_its_table_chart_curves_and_downloads(runs_dir):
    sweep = trained_sweep(runs_dir)
    at = experiments_page()
    assert at.selectbox(key="exp_sweep").value == "abl"
    answer = at.dataframe[0].value  # the answer first: each change, its effect and a verdict
    assert list(answer["change"]) == ["base", "+ ema_decay=0.9"]
    # (40.5 − 12.5) / (300 − 12.5) = 0.10 of the way from the floor to noise
    assert list(answer["verdict"]) == ["", "recognisable"]
    assert any("Single seed" in c.value for c in at.caption)
    table = at.dataframe[1].value
    assert list(table["verdict"]) == ["", "recognisable"]
    assert list(table["run"]) == [r.name for r in sweep.runs]
    assert list(table["label"]) == ["base", "+ ema_decay=0.9"]
    assert list(table["steps"]) == [6, 6] and list(table["state"]) == ["finished", "finished"]
    assert table["fd"].isna().tolist() == [True, False] and table["fd"].iloc[1] == 40.5
    charts = {c.key for c in at.get("plotly_chart")} if at.get("plotly_chart") else set()
    bars = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    fd_chart = next(b for b in bars if b["data"][0]["type"] == "bar")
    assert fd_chart["data"][0]["x"] == ["2. + ema_decay=0.9"] and fd_chart["data"][0]["y"] == [40.5]
    assert len(bars) == 2, charts  # the bar chart and the loss curves
    assert [b.proto.label for b in at.get("download_button")] == ["Results as CSV", "Results as JSON"]


def test_the_form_queues_a_sweep_and_bad_definitions_create_nothing(runs_dir):
    runs_dir.mkdir(parents=True)
    queue.pause(runs_dir)  # hold the queue: this test checks what is queued, not the training
    at = experiments_page()
    assert any("No sweeps yet" in i.value for i in at.info)
    at.text_input(key="exp_new_name").set_value("bad")
    at.text_area(key="exp_new_factors").set_value("optimiser=adam,adamw")
    at.run()
    assert any("Not ready" in w.value and "unknown factor" in w.value for w in at.warning)  # said before the click
    at.button(key="exp_create").click().run()
    assert any("Not created" in e.value and "unknown factor" in e.value for e in at.error)
    assert sweeps.list_sweeps(runs_dir) == [] and queue.read_queue(runs_dir).entries == ()

    at.text_input(key="exp_new_name").set_value("opt")
    at.text_area(key="exp_new_factors").set_value("optimizer=adam,adamw")
    at.selectbox(key="exp_new_budget_kind").set_value("images")
    at.number_input(key="exp_new_budget").set_value(20.0).run()  # the budget: one step per run
    at.button(key="exp_create").click().run()
    assert any("Not created" in e.value and "under the minimum of 20" in e.value for e in at.error)
    assert queue.read_queue(runs_dir).entries == ()
    at.text_area(key="exp_new_factors").set_value("ema_decay=0.99,0.999")
    at.selectbox(key="exp_new_budget_kind").set_value("steps")
    at.number_input(key="exp_new_budget").set_value(50.0).run()
    horizons = [w.value for w in at.warning if "EMA horizon" in w.value]
    assert len(horizons) == 2 and "EMA horizon of 100 steps" in horizons[0] and "of 1000 steps" in horizons[1]
    at.text_area(key="exp_new_factors").set_value("optimizer=adam,adamw")
    at.number_input(key="exp_new_budget").set_value(20.0)
    at.number_input(key="exp_new_eval_n").set_value(32)
    at.button(key="exp_create").click().run()
    assert not at.exception
    assert any("2 runs queued" in s.value for s in at.success)
    assert [e.run for e in queue.read_queue(runs_dir).queued] == ["opt-00-optimizer-adam", "opt-01-optimizer-adamw"]
    assert queue.read_queue(runs_dir).eval is None  # later runs are not scored because of this sweep
    assert sweeps.queue_evaluation(runs_dir, "opt-00-optimizer-adam") == queue.EvalSetting("dpmpp2m-sde", 20, 32)
    assert runs.load_config(runs_dir / "opt-01-optimizer-adamw").train.max_steps == 20
    assert list(at.dataframe[1].value["state"]) == ["created", "created"]
    assert at.query_params["sweep"] in ("opt", ["opt"])  # a reload stays on the new sweep


def test_a_damaged_sweep_file_is_reported_and_left_alone(runs_dir):
    sweep = sweeps.plan("dam", "tiny", sweeps.Budget("steps", 2), factors=[sweeps.parse_factor("seed=0,1")])
    folder = sweeps.create(runs_dir, sweep)
    (folder / "sweep.json").write_bytes(b'{"format_version": 1, "runs": 7}')
    at = experiments_page()
    assert any("sweep.json" in e.value and "restore it or delete" in e.value for e in at.error)
    assert (folder / "sweep.json").read_bytes() == b'{"format_version": 1, "runs": 7}'


def test_the_shipped_ablation_leads_with_each_changes_effect_and_its_spread(monkeypatch):
    monkeypatch.setenv("DDPM_RUNS_DIR", str(REPO / "checkpoints"))
    at = experiments_page()
    assert at.selectbox(key="exp_sweep").value == "blog-ablation"
    answer = at.dataframe[0].value
    assert list(answer["vs the step before"]) == ["", "-42%", "-1%", "+44%", "+8%", "-60%", "+2%"]
    # improved-lr-seed1's first run repeats step 7 with seed 1: 9.34 against 11.36, 19 % apart
    assert list(answer["spread"])[1:] == ["outside the ±10% seed spread", "within the ±10% seed spread",
                                          "outside the ±10% seed spread", "within the ±10% seed spread",
                                          "outside the ±10% seed spread", "within the ±10% seed spread"]
    assert set(answer["verdict"]) == {"recognisable"}
    text = at.info[0].value
    assert "step 6, + EMA 0.999 (-60%)" in text and "step 3 (-1%)" in text and "Step 4, + lr 2e-3" in text
    assert "Also outside the seed spread: step 2, + ImprovedUNet (12 wide) (-42%)" in text
