"""The CLI round trip as a user types it: train a few steps, resume, list, sample to PNG/.npy/.npz.

The first command is a real `python -m core` process; the rest run main() in this process
(conftest's run_core), which answers the same without paying for an interpreter and torch each time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_core

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "quick", "--base-channels", "8", "--channel-mults", "1", "2", "--timesteps", "20",
        "--batch-size", "32", "--limit-images", "256", "--device", "cpu", "--quiet"]


def core(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_DATA_ROOT": str(REPO / "data")}
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.integration
def test_train_resume_sample_round_trip(tmp_path):
    runs_dir = tmp_path / "runs"
    first = core("train", *TINY, "--max-steps", "6", "--runs-dir", str(runs_dir), "--name", "cli")
    assert first.returncode == 0, first.stderr
    assert "finished" in first.stdout and "step 6" in first.stdout

    again = run_core("train", *TINY, "--max-steps", "6", "--runs-dir", str(runs_dir), "--name", "cli")
    assert again.returncode == 2 and "exists" in again.stderr and "--resume" in again.stderr

    resumed = run_core("train", "--resume", "--name", "cli", "--max-steps", "12", "--runs-dir", str(runs_dir),
                   "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "step 12" in resumed.stdout
    steps = [int(line.split(",")[0]) for line in (runs_dir / "cli" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == 12 and len(set(steps)) == len(steps)

    listing = run_core("runs", "--runs-dir", str(runs_dir), "--json")
    row = json.loads(listing.stdout)[0]
    assert row["name"] == "cli" and row["step"] == 12 and row["state"] == "finished"
    assert row["model"] == "improved_unet" and row["optimizer"] == "adamw"

    out = tmp_path / "grid.png"
    sampled = run_core("sample", "--run", str(runs_dir / "cli"), "--sampler", "ddim", "--steps", "5", "--n", "6",
                   "--out", str(out), "--npy", str(tmp_path / "s.npy"), "--frames", str(tmp_path / "f.npz"),
                   "--quiet")
    assert sampled.returncode == 0, sampled.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = np.load(tmp_path / "s.npy")
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    frames = np.load(tmp_path / "f.npz")
    assert frames["x_t"].shape == (5, 6, 1, 28, 28) and list(frames["timesteps"]) == [20, 16, 12, 8, 4]
    assert np.array_equal(frames["images"], images)


def test_help_explains_every_flag():
    result = run_core("train", "--help")
    assert result.returncode == 0
    for flag in ("--preset", "--model", "--optimizer", "--dataset", "--epochs", "--max-steps", "--batch-size",
                 "--lr", "--weight-decay", "--timesteps", "--schedule", "--seed", "--device", "--runs-dir",
                 "--name", "--resume"):
        assert flag in result.stdout
    assert "sampler" in run_core("sample", "--help").stdout


def test_models_listing_prints_params_and_flops():
    result = run_core("runs", "--models", "--json")
    rows = {r["preset"]: r for r in json.loads(result.stdout)}
    assert rows["book"]["params"] == 2_167_784
    assert rows["improved"]["train_vs_book"] <= 1.5
