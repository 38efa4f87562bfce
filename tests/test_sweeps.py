"""Sweeps: one command makes the runs and the results table; every bad definition is refused with
nothing created; a damaged run or sweep file stays confined; a sweep continues where it stopped."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from core.store import runs
from core.work import sweeps
from core.cli.main import main
from core.config import ConfigError, override, preset
from core.errors import RunError
from tests.conftest import run_core

REPO = Path(__file__).resolve().parents[1]
core = run_core  # `python -m core ...` in this process: the sweep's cost is training, not starting Python


@pytest.mark.integration
def test_one_command_makes_two_runs_and_a_results_table(tmp_path):
    runs_dir = tmp_path / "runs"
    result = core("sweep", "--preset", "tiny", "--vary", "optimizer=adam,adamw", "--budget-steps", "20",
                  "--eval-n", "64", "--runs-dir", str(runs_dir), "--name", "opt", "--quiet")
    assert result.returncode == 0, result.stderr
    folder = runs_dir / "sweeps" / "opt"
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["opt-00-optimizer-adam", "opt-01-optimizer-adamw"]
    for row, optimizer in zip(rows, ("adam", "adamw")):
        assert row["state"] == "finished" and row["steps"] == "20" and row["images"] == str(20 * 32)
        assert float(row["final_loss"]) > 0 and float(row["fd"]) > 0 and float(row["floor"]) > 0
        assert row["setting"] == "dpmpp2m-sde-20" and row["n"] == "64"
        assert runs.load_config(runs_dir / row["run"]).train.optimizer == optimizer
        # the score is the run's own eval.json entry, so every page shows it too
        assert [e["n"] for e in runs.read_eval(runs_dir / row["run"])] == [64]
    table = json.loads((folder / "results.json").read_text())
    assert table["budget"] == {"kind": "steps", "amount": 20} and len(table["rows"]) == 2
    # The sweep folder is not a run: the run list shows the two runs only.
    assert sorted(i.name for i in runs.list_runs(runs_dir)) == ["opt-00-optimizer-adam", "opt-01-optimizer-adamw"]

    # the report of a sweep: its table in Markdown, the bar chart and the loss curves as PNG
    docs = tmp_path / "docs"
    written = core("report", "--sweep", "opt", "--runs-dir", str(runs_dir), "--out", str(docs))
    assert written.returncode == 0, written.stderr
    table = (docs / "opt_table.md").read_text().splitlines()
    assert len(table) == 4 and "| optimizer=adam |" in table[2] and "| optimizer=adamw |" in table[3]
    for png in ("opt_fd.png", "opt_loss.png"):
        assert (docs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, says", [
    (["--preset", "tiny", "--vary", "optimiser=adam,adamw", "--budget-steps", "5"], "unknown factor"),
    (["--preset", "tiny", "--vary", "optimizer=adam,sgd", "--budget-steps", "5"], "'sgd' is not allowed"),
    (["--preset", "tiny", "--budget-steps", "5"], "the grid is empty"),
    (["--preset", "tiny", "--vary", "optimizer=", "--budget-steps", "5"], "has no values"),
    (["--preset", "tiny", "--vary", "seed=" + ",".join(map(str, range(65))), "--budget-steps", "5"], "more than 64"),
    (["--preset", "tiny", "--vary", "optimizer=adam,adamw", "--vary", "seed=0,1,2,3,4,5,6,7",
      "--vary", "ema_decay=0,0.9,0.99,0.999,0.9999", "--budget-steps", "5"], "80 runs, more than 64"),
    (["--preset", "tiny", "--vary", "optimizer=adam,adamw", "--budget-steps", "0"], "above 0"),
    (["--preset", "tiny", "--vary", "optimizer=adam,adamw", "--budget-s", "0"], "above 0"),
    (["--preset", "tiny", "--vary", "optimizer=adam,adamw"], "needs a budget"),
    (["--preset", "tiny", "--vary", "epochs=1,2", "--budget-steps", "5"], "budget"),
    (["--preset", "tiny", "--vary", "ema_decay=0.5,x", "--budget-steps", "5"], "a number"),
    (["--preset", "tiny", "--mode", "path", "--vary", "optimizer=adam,adamw", "--budget-steps", "5"], "path mode"),
    (["--path", "blog", "--vary", "optimizer=adam", "--budget-steps", "5"], "do not mix"),
    (["--preset", "tiny", "--vary", "optimizer=adam,adamw", "--budget-steps", "5", "--name", "../x"], "name"),
    (["--preset", "tiny", "--vary", "timesteps=20", "--budget-steps", "5", "--eval-n", "8", "--eval-steps", "50"],
     "between 1 and T = 20"),
    (["--resume", "nope"], "no such sweep"),
])
def test_bad_definitions_are_one_line_exit_2_and_create_nothing(tmp_path, capsys, flags, says):
    runs_dir = tmp_path / "runs"
    try:  # in-process: the same main as `python -m core`; argparse's own refusals exit through SystemExit
        status = main(["sweep", *flags, "--runs-dir", str(runs_dir)])
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_the_blog_path_goes_from_the_book_to_improved_one_change_at_a_time():
    budget = sweeps.Budget("images", 128_000)
    sweep = sweeps.plan("abl", None, budget, path="blog")
    configs = [r.config for r in sweep.runs]
    assert configs[0] == budget.apply(preset("book")) and configs[-1] == budget.apply(preset("improved"))
    assert [r.name for r in sweep.runs][:2] == ["abl-00-book", "abl-01-improved-unet"]
    for before, after in zip(sweep.runs, sweep.runs[1:]):  # each step keeps every change before it
        assert all(after.changes.get(k) == v for k, v in before.changes.items())
        assert len(after.changes) > len(before.changes)
    assert all(c.train.max_steps == 1000 and c.train.epochs == 0 for c in configs)  # 128,000 / batch 128
    # the shipped ablation: the same path at the demo pair's widths (book 16, improved 12)
    demo = [r.config for r in sweeps.plan("d", None, budget, path="blog-demo").runs]
    assert demo[0] == budget.apply(override(preset("book"), base_channels=16))
    assert demo[-1] == budget.apply(override(preset("improved"), base_channels=12))


def test_a_path_from_factors_adds_one_change_per_run():
    sweep = sweeps.plan("p", "tiny", sweeps.Budget("steps", 5), mode="path",
                        factors=[sweeps.parse_factor("optimizer=adam"), sweeps.parse_factor("ema_decay=0.9")])
    assert [r.changes for r in sweep.runs] == [{}, {"optimizer": "adam"}, {"optimizer": "adam", "ema_decay": 0.9}]


def test_budgets_set_the_only_limit():
    config = preset("book")
    by_images = sweeps.Budget("images", 1000).apply(config).train
    assert (by_images.max_steps, by_images.epochs, by_images.time_budget_s) == (8, 0, 0.0)  # ceil(1000 / 128)
    by_time = sweeps.Budget("seconds", 90).apply(config).train
    assert (by_time.max_steps, by_time.epochs, by_time.time_budget_s) == (0, 0, 90.0)
    with pytest.raises(sweeps.SweepError, match="whole number"):
        sweeps.Budget("steps", 2.5)


def test_factor_values_are_typed_like_their_fields():
    assert sweeps.parse_factor("channel_mults=1/2,1/2/2") == ("channel_mults", ((1, 2), (1, 2, 2)))
    assert sweeps.parse_factor("attention=on,off") == ("attention", (True, False))
    assert sweeps.parse_factor("model=unet,improved_unet") == ("model", ("unet", "improved_unet"))
    assert sweeps.parse_factor("lr=1e-3") == ("lr", (0.001,))
    with pytest.raises(sweeps.SweepError, match="given twice"):
        sweeps.parse_factor("optimizer=adam,adam")


def test_a_sweep_continues_and_a_damaged_run_is_a_row_not_a_crash(tmp_path, tiny_images):
    sweep = sweeps.plan("s", "tiny", sweeps.Budget("steps", 4), factors=[sweeps.parse_factor("seed=0,1,2")])
    sweeps.create(tmp_path, sweep)
    with pytest.raises(sweeps.SweepError, match="exists"):  # the same name again creates nothing
        sweeps.create(tmp_path, sweep)
    (tmp_path / "s-01-seed-1" / "config.json").write_text("{ not json")
    trained: list[str] = []

    def train(run_dir: Path) -> None:
        from core.train.training import train_run
        trained.append(run_dir.name)
        train_run(run_dir, resume=True, images=tiny_images)

    rows = sweeps.run(tmp_path, "s", train, lambda *_: None)
    assert trained == ["s-00-seed-0", "s-02-seed-2"]  # the damaged run is skipped, the sweep goes on
    assert [r["state"] for r in rows] == ["finished", "damaged", "finished"]
    assert "config.json" in rows[1]["error"] and rows[1]["steps"] == 0
    trained.clear()
    sweeps.run(tmp_path, "s", train, lambda *_: None)
    assert trained == []  # finished runs are not trained again


def test_a_damaged_sweep_file_is_refused_with_the_reason(tmp_path):
    sweep = sweeps.plan("d", "tiny", sweeps.Budget("steps", 4), factors=[sweeps.parse_factor("seed=0,1")])
    folder = sweeps.create(tmp_path, sweep)
    definition = json.loads((folder / "sweep.json").read_text())
    definition["runs"][0]["name"] = "../../etc"
    (folder / "sweep.json").write_text(json.dumps(definition))
    with pytest.raises(RunError, match="not a run name"):
        sweeps.load(tmp_path, "d")
    (folder / "sweep.json").write_text("[" * 100_000)
    with pytest.raises(RunError):
        sweeps.load(tmp_path, "d")


def test_no_run_may_be_called_sweeps(tmp_path):
    with pytest.raises(ConfigError, match="sweeps"):
        runs.create_run(tmp_path, "sweeps", preset("tiny"))
