"""Issue 23, reliability round three: one test per failure (F1-F7) and questionable case (Q1-Q9).

Each test states the case it pins. Commands run in-process (`core.cli.main.main`), so a traceback
fails the test as the exception it is; a tiny run with two checkpoints (newest 6, previous/ 5) is
trained once for the module and copied per test.
"""
from __future__ import annotations

import contextlib
import io as text_io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.cli.main import main
from core.config import ConfigError, RunConfig
from core.errors import RunError
from core.evaluation import classifier as classifier_module
from core.evaluation.classifier import ClassifierError, FitConfig, fit, load_classifier, save_classifier
from core.evaluation.frechet import QualityEvaluator
from core.store import checkpoint, io, runs
from core.store.export import run_bundle
from core.train.training import train_run
from core.work import queue
from tests.conftest import REPO, make_tiny_images, tiny_config

HUGE = "9" * 400


def cli(*args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m core ARGS`, run in this process."""
    out, err = text_io.StringIO(), text_io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def one_line(rc: int, err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-2000:])
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny EMA run checkpointed at every step: newest checkpoint 6, previous/ 5."""
    run = runs.create_run(tmp_path_factory.mktemp("r3") / "runs", "two",
                          tiny_config(ema_decay=0.9, checkpoint_every_s=1e-9))
    train_run(run, images=make_tiny_images())
    return run


def copy_run(source: Path, root: Path, name: str) -> Path:
    target = root / name
    shutil.copytree(source, target, symlinks=True)
    (target / ".lock").unlink(missing_ok=True)
    return target


@pytest.fixture
def root(tmp_path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


def reseal(run: Path) -> None:
    """Rewrite checkpoint.json for the files as they now are: what a hostile sharer can do."""
    manifest = json.loads((run / checkpoint.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (run / name).read_bytes()
        manifest["files"][name] = {"sha256": io.sha256_hex(data), "size": len(data)}
    (run / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def listed(root: Path) -> dict[str, dict]:
    rc, out, err = cli("runs", "--runs-dir", str(root), "--json")
    assert rc == 0, err
    return {row["name"]: row for row in json.loads(out)}


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A classifier fitted for 3 steps on tiny images: enough to have statistics to damage."""
    images = make_tiny_images(128)
    fitted = fit(images, images, FitConfig(epochs=1, max_steps=3, batch_size=32))
    path = tmp_path_factory.mktemp("classifiers") / "fashion_mnist.safetensors"
    save_classifier(fitted, path)
    return path


# -- F1: a damaged evaluation cache ---------------------------------------------------------------
def flip_exponent_bit(path: Path) -> None:
    """Flip one exponent bit of the first number of a safetensors file's data (finite afterwards)."""
    blob = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little")
    blob[start + 6] ^= 0x20  # a bit of the exponent of a float64 (or a high byte of an int64)
    path.write_bytes(bytes(blob))


def test_f1_damaged_test_stats_cache_is_recomputed_not_used(tiny_classifier):
    """F1: one flipped bit in <dataset>.test-stats.safetensors was used as is (only its metadata was
    checked): FD 0.0, ratio inf. Now the sha256 in its manifest refuses it and it is recomputed."""
    test = make_tiny_images(64, seed=1)
    samples = make_tiny_images(32, seed=2).images
    classifier = load_classifier("fashion_mnist", tiny_classifier.parent)
    first = QualityEvaluator(classifier, test)
    good = first.frechet_distance(samples)
    cache = tiny_classifier.with_name("fashion_mnist.test-stats.safetensors")
    assert cache.is_file() and QualityEvaluator(classifier, test).stats_from_cache
    flip_exponent_bit(cache)
    again = QualityEvaluator(classifier, test)
    assert not again.stats_from_cache, "a damaged cache was used"
    assert "damaged" in again.cache_note
    assert again.frechet_distance(samples) == pytest.approx(good, rel=1e-6)
    assert QualityEvaluator(classifier, test).stats_from_cache  # rewritten intact


def test_f1_non_finite_figure_never_replaces_a_good_eval_entry(trained, root):
    """F1: append_eval wrote `Infinity` over the earlier correct entry, and the reader then refused
    the whole eval.json. Now a non-finite entry is refused and the file is left as it was."""
    run = copy_run(trained, root, "ev")
    key = {"setting": "ddim-10", "n": 8, "classifier_sha256": "abc"}
    runs.append_eval(run, {**key, "fd": 70.42, "fd_ratio": 3.1})
    before = (run / "eval.json").read_bytes()
    with pytest.raises(RunError, match="non-finite"):
        runs.append_eval(run, {**key, "fd": 0.0, "fd_ratio": float("inf")})
    assert (run / "eval.json").read_bytes() == before
    assert runs.run_info(run).evals[-1]["fd"] == 70.42


# -- F2: sweep names of 78-80 characters -------------------------------------------------------------
def test_f2_long_sweep_name_is_refused_before_anything_exists(root):
    """F2: names were cut to 80, so two runs got one name: exit 2 after sweep.json and the first run
    folder were made. Now the name is refused first, and 77 characters give distinct run names."""
    base = ["sweep", "--runs-dir", str(root), "--preset", "tiny", "--budget-steps", "2",
            "--vary", "optimizer=adam,adamw", "--create-only"]
    one_line(*cli(*base, "--name", "y" * 78)[::2], "at most 77")
    assert sorted(p.name for p in root.iterdir()) == []
    rc, _, err = cli(*base, "--name", "z" * 77)
    assert rc == 0, err
    made = sorted(p.name for p in root.iterdir() if p.name.startswith("z"))
    assert len(made) == 2 and len(set(made)) == 2


# -- F3: a queue stuck for good after its worker was killed on the last entry -------------------------
def test_f3_killed_worker_on_last_entry_is_recovered_by_every_command(trained, root):
    """F3: the entry stayed `running` for good (`remove` said "is training", `add` "already
    running"): recover() ran only when another entry was queued. Now every command recovers."""
    copy_run(trained, root, "a")
    queue.add(root, ["a"])
    claim = queue.claim_next(root)
    claim.release()  # the worker lock is dropped as by SIGKILL; the entry still says running
    rc, out, err = cli("queue", "list", "--runs-dir", str(root), "--json")
    assert rc == 0, err
    assert [e["state"] for e in json.loads(out)["entries"]] == ["interrupted"]
    rc, _, err = cli("queue", "add", "--runs-dir", str(root), "a")
    assert rc == 0, err
    rc, _, err = cli("queue", "remove", "--runs-dir", str(root), claim.entry.id)
    assert rc == 0, err


# -- F4: the run lock written through a link ----------------------------------------------------------
def test_f4_run_lock_is_never_written_through_a_linked_run_folder(trained, root, tmp_path):
    """F4: with <runs>/a a link to another folder, the lock was opened with O_CREAT + ftruncate
    through it: that folder's .lock got our pid. Now the run folder is opened without following."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".lock").write_text("theirs")
    os.symlink(elsewhere, root / "a")
    with pytest.raises(RunError, match="symbolic link"):
        runs.RunLock(root / "a").acquire()
    assert (elsewhere / ".lock").read_text() == "theirs"


# -- F5: sweeps/ as a link out of the runs folder -----------------------------------------------------
def test_f5_sweep_never_writes_through_a_linked_sweeps_folder(root, tmp_path):
    """F5: `sweep --create-only` exited 0 and wrote sweep.json and the results outside the runs folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "sweeps")
    rc, _, err = cli("sweep", "--runs-dir", str(root), "--preset", "tiny", "--budget-steps", "2",
                     "--vary", "optimizer=adam,adamw", "--create-only", "--name", "s")
    one_line(rc, err, "symbolic link")
    assert list(outside.iterdir()) == []


# -- F6: a 400-digit integer -------------------------------------------------------------------------
def test_f6_huge_integers_are_one_line_and_the_list_goes_on(trained, root):
    """F6: a 400-digit integer raised OverflowError from `runs` (the whole list), `queue`, `sweep
    --resume` and `report`. Now the one JSON reader bounds integers where it parses them."""
    copy_run(trained, root, "healthy")
    lr = copy_run(trained, root, "lr")
    config = json.loads((lr / "config.json").read_text())
    (lr / "config.json").write_text(json.dumps(config).replace('"lr": 0.002', f'"lr": {HUGE}'))
    fd = copy_run(trained, root, "fd")
    (fd / "eval.json").write_text(f'[{{"setting": "ddim-10", "n": 8, "fd": {HUGE}}}]')
    rows = listed(root)
    assert rows["healthy"]["state"] == "finished"
    assert rows["lr"]["state"] == rows["fd"]["state"] == "damaged"
    assert "out of range" in rows["lr"]["error"] and "out of range" in rows["fd"]["error"]
    one_line(*cli("report", "--runs", str(fd), "--out", str(root.parent / "docs"))[::2], "out of range")
    (root / "queue.json").write_text(json.dumps({"format_version": 1, "paused": False, "eval": None, "entries": [
        {"id": "0123abcd", "run": "healthy", "state": "queued", "added_at": int(HUGE), "started_at": None,
         "ended_at": None, "error": None}]}))
    one_line(*cli("queue", "list", "--runs-dir", str(root))[::2], "out of range")
    (root / "queue.json").unlink()
    assert cli("sweep", "--runs-dir", str(root), "--preset", "tiny", "--budget-steps", "2", "--vary",
               "optimizer=adam", "--create-only", "--name", "s")[0] == 0
    sweep_json = root / "sweeps" / "s" / "sweep.json"
    sweep_json.write_text(sweep_json.read_text().replace('"amount": 2', f'"amount": {HUGE}'))
    one_line(*cli("sweep", "--runs-dir", str(root), "--resume", "s")[::2], "out of range")


# -- F7: results.csv replaced by a folder -------------------------------------------------------------
def test_f7_results_csv_as_a_folder_is_one_line(root):
    """F7: the results rewrite raised IsADirectoryError (a link or a FIFO was handled)."""
    assert cli("sweep", "--runs-dir", str(root), "--preset", "tiny", "--budget-steps", "2", "--vary",
               "optimizer=adam", "--create-only", "--name", "s")[0] == 0
    results = root / "sweeps" / "s" / "results.csv"
    results.unlink()
    results.mkdir()
    one_line(*cli("report", "--sweep", "s", "--runs-dir", str(root), "--out", str(root.parent / "docs"))[::2],
             "results.csv is a folder")


# -- Q1, Q2: a fallback to previous/ is said out loud -------------------------------------------------
def test_q1_damaged_newest_checkpoint_fallback_is_said_everywhere(trained, root, tmp_path):
    """Q1: a flipped byte in the newest weights silently fell back to previous/ for `sample`;
    `runs` showed the newer step. Now the list shows step 5 with a note, `sample` says it on stderr."""
    run = copy_run(trained, root, "flip")
    blob = bytearray((run / "ema.safetensors").read_bytes())
    blob[-5] ^= 0x01
    (run / "ema.safetensors").write_bytes(bytes(blob))
    row = listed(root)["flip"]
    assert row["step"] == 5 and "previous" in row["fallback"] and "ema.safetensors" in row["fallback"]
    rc, _, err = cli("sample", "--run", str(run), "--sampler", "ddim", "--steps", "2", "--n", "1", "--quiet",
                     "--device", "cpu", "--out", str(tmp_path / "grid.png"))
    assert rc == 0 and "note:" in err and "previous" in err, err


def test_q1_truncated_model_without_previous_lists_damaged(trained, root):
    """Q1: a truncated model.safetensors listed as "finished"."""
    run = copy_run(trained, root, "cut")
    shutil.rmtree(run / checkpoint.PREVIOUS)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    row = listed(root)["cut"]
    assert row["state"] == "damaged" and "model.safetensors" in row["error"]


def test_q2_planted_nan_weights_fall_back_to_intact_previous(trained, root):
    """Q2: NaN weights under a resealed manifest were refused as "the run diverged"; the intact
    previous/ was not offered. Now it is loaded, with a note that says why."""
    run = copy_run(trained, root, "nan")
    for name in ("model.safetensors", "ema.safetensors"):
        state = io.read_safetensors(run / name, "nan")
        state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(run / name))
    reseal(run)
    loaded = runs.load_model(run)
    assert loaded.fallback and "non-finite" in loaded.fallback and "step 5" in loaded.fallback


# -- Q3: error lines have a length limit --------------------------------------------------------------
def test_q3_error_lines_are_short(trained, root):
    """Q3: a 10,000-entry channel_mults printed a 30,134-character line."""
    run = copy_run(trained, root, "wide")
    config = json.loads((run / "config.json").read_text())
    config["model"]["channel_mults"] = [1] * 10_000
    (run / "config.json").write_text(json.dumps(config))
    assert len(listed(root)["wide"]["error"]) < 300
    line = one_line(*cli("sample", "--run", str(run), "--n", "1")[::2], "channel_mults")
    assert len(line) < 300


# -- Q4, Q5, Q6: refusals up front ------------------------------------------------------------------
def test_q4_queue_eval_refuses_n_below_2(root):
    """Q4: `queue eval --n 1` was accepted, then every evaluation failed."""
    one_line(*cli("queue", "eval", "--runs-dir", str(root), "--sampler", "ddim", "--steps", "10", "--n", "1")[::2],
             "at least 2")
    assert not (root / "queue.json").exists()


def test_q5_a_run_may_not_be_named_queue_json(root):
    """Q5: `train --name queue.json` made the queue report itself damaged forever."""
    with pytest.raises(ConfigError, match="run queue"):
        runs.create_run(root, "queue.json", tiny_config())
    assert not (root / "queue.json").exists()


def test_q6_unknown_top_level_config_keys_are_refused():
    """Q6: unknown keys at the top of config.json were accepted silently (inside a section refused)."""
    data = json.loads(tiny_config().to_json())
    with pytest.raises(ConfigError, match="unknown top-level keys: trian"):
        RunConfig.from_json(json.dumps({**data, "trian": {}}))


# -- Q7: a sweep with failed runs does not exit 0 ------------------------------------------------------
def test_q7_sweep_with_a_run_that_cannot_train_exits_non_zero(root):
    """Q7: a sweep exited 0 although runs failed."""
    assert cli("sweep", "--runs-dir", str(root), "--preset", "tiny", "--budget-steps", "2", "--vary",
               "optimizer=adam", "--create-only", "--name", "s")[0] == 0
    (root / "s-00-optimizer-adam" / "config.json").write_text("{")
    rc, _, err = cli("sweep", "--runs-dir", str(root), "--resume", "s", "--quiet")
    assert rc == 1 and "did not finish" in err, (rc, err)


# -- Q8: a damaged shipped classifier ------------------------------------------------------------------
def test_q8_damaged_shipped_classifier_uses_the_one_fitted_here(tiny_classifier, tmp_path, monkeypatch):
    """Q8: a damaged shipped classifier made `eval` refit every time and never use the refitted one."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "fashion_mnist.safetensors").write_bytes(tiny_classifier.read_bytes()[:100])
    monkeypatch.delenv("DDPM_CLASSIFIER_DIR", raising=False)
    monkeypatch.setattr(classifier_module, "SHIPPED_CLASSIFIER_DIR", shipped)
    monkeypatch.setattr(classifier_module, "DEFAULT_CLASSIFIER_DIR", tiny_classifier.parent)
    loaded = load_classifier("fashion_mnist")
    assert loaded.path == tiny_classifier and "fitted here" in loaded.note and "shipped" not in str(loaded.path)
    monkeypatch.setattr(classifier_module, "DEFAULT_CLASSIFIER_DIR", tmp_path / "none")
    with pytest.raises(ClassifierError):
        load_classifier("fashion_mnist")


# -- Q9: links -----------------------------------------------------------------------------------------
def test_q9_hard_link_in_samples_stays_out_of_the_bundle(trained, root, tmp_path):
    """Q9: a hard link in samples/ went into the zip bundle."""
    run = copy_run(trained, root, "bundle")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not yours")
    os.link(secret, run / "samples" / "stolen.png")
    names = zipfile.ZipFile(text_io.BytesIO(run_bundle(run))).namelist()
    assert "bundle/samples/stolen.png" not in names and "bundle/config.json" in names


def test_q9_resume_of_a_link_to_a_sibling_run_is_refused(trained, root):
    """Q9: `train --resume --name link` (a link to a sibling run) resumed the sibling."""
    sibling = copy_run(trained, root, "sibling")
    os.symlink(sibling, root / "link")
    before = (sibling / "status.json").read_bytes()
    one_line(*cli("train", "--runs-dir", str(root), "--resume", "--name", "link", "--max-steps", "8")[::2],
             "link")
    assert (sibling / "status.json").read_bytes() == before


def test_q9_argument_errors_name_the_whole_subcommand():
    """Q9: argument errors named `python -m core move --help` for `queue move`."""
    rc, _, err = cli("queue", "move")
    assert rc == 2 and "python -m core queue move --help" in err


def test_q9_dashboard_started_elsewhere_refuses_to_serve_without_its_binding(tmp_path):
    """Q9: .streamlit/config.toml is read from the working folder, so the app started elsewhere
    dropped the 127.0.0.1 binding and XSRF protection. Now it refuses to serve, and says where to start."""
    code = ("from streamlit.testing.v1 import AppTest\n"
            f"at = AppTest.from_file({str(REPO / 'dashboard' / 'app.py')!r}, default_timeout=120).run()\n"
            "print('ERRORS', [e.value for e in at.error], 'EXCEPTIONS', len(at.exception))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "started outside" in proc.stdout and "EXCEPTIONS 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_class_a_fitted_classifier_with_a_flipped_bit_is_refused(tiny_classifier, tmp_path):
    """The class behind F1/Q8: derived files are verified like checkpoints. A classifier fitted here
    carries the sha256 of its weights; one flipped bit is refused instead of scoring with it."""
    damaged = tmp_path / "fashion_mnist.safetensors"
    shutil.copy(tiny_classifier, damaged)
    flip_exponent_bit(damaged)
    with pytest.raises(ClassifierError, match="sha256"):
        load_classifier("fashion_mnist", tmp_path)
