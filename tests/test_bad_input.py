"""Bad input gets a clear answer: the field, the value and what is allowed, from one place.

Two tables of the same mistakes: one through the Python API (configs and functions), one through
`python -m core train | sample`, which must exit with status 2 and print ONE line on stderr, no
traceback. The table runs the CLI's main() in this process (conftest's run_core: an interpreter
start per case cost more than the case); `test_cli_rejects_as_a_real_process` keeps the process
boundary itself under test. A rejected `train` must leave no half-made run folder behind and must
not touch the runs already there. The CLI cases all fail at validation, so nothing trains; were one
wrongly accepted it would train a 1-step, 64-image run and the test would fail on its exit status.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.store import runs
from core.config import (ConfigError, DataConfig, ModelConfig, RunConfig, SampleConfig, ScheduleConfig, TrainConfig,
                         check_run_name, override, preset)
from core.data.datasets import ImageSet
from core.models import build_model
from core.diffusion.sampling import sample
from core.diffusion.schedule import NoiseScheduler
from core.device import resolve_device
from core.train.training import train_run
from tests.conftest import REPO, make_tiny_images, run_core, tiny_config

NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="this case needs a machine without a CUDA GPU")


# -- the Python API ------------------------------------------------------------------------------------
API_CASES = [
    # (id, call, substrings the ConfigError message must hold: field = value, and the rule)
    ("lr-zero", lambda: TrainConfig(lr=0.0), ["lr = 0.0", "greater than 0"]),
    ("lr-negative", lambda: TrainConfig(lr=-1e-3), ["lr = -0.001", "greater than 0"]),
    ("lr-text", lambda: TrainConfig(lr="1e-3"), ["lr = '1e-3'", "finite number"]),
    ("lr-nan", lambda: TrainConfig(lr=math.nan), ["lr = nan", "finite number"]),
    ("lr-inf", lambda: TrainConfig(lr=math.inf), ["lr = inf", "finite number"]),
    ("lr-bool", lambda: TrainConfig(lr=True), ["lr = True", "finite number"]),
    ("weight-decay-negative", lambda: TrainConfig(weight_decay=-0.01), ["weight_decay = -0.01", "at least 0"]),
    ("batch-zero", lambda: TrainConfig(batch_size=0), ["batch_size = 0", "at least 1"]),
    ("batch-fraction", lambda: TrainConfig(batch_size=2.5), ["batch_size = 2.5", "whole number"]),
    ("batch-over-limit-images", lambda: TrainConfig(batch_size=300, limit_images=256),
     ["batch_size = 300", "256 images"]),
    ("epochs-and-steps-zero", lambda: TrainConfig(epochs=0, max_steps=0), ["epochs = 0", "never train"]),
    ("timesteps-one", lambda: ScheduleConfig(timesteps=1), ["timesteps = 1", "at least 2"]),
    ("timesteps-zero", lambda: ScheduleConfig(timesteps=0), ["timesteps = 0", "at least 2"]),
    ("ddim-steps-over-T", lambda: SampleConfig(sampler="ddim", steps=21).resolved_steps(20),
     ["steps = 21", "between 1 and T = 20"]),
    ("ddim-steps-negative", lambda: SampleConfig(sampler="ddim", steps=-1), ["steps = -1", "at least 0"]),
    ("in-channels", lambda: ModelConfig(in_channels=2), ["in_channels = 2", "1 (grayscale) or 3 (colour)"]),
    ("out-channels", lambda: ModelConfig(out_channels=2), ["out_channels = 2", "1 (grayscale) or 3"]),
    ("channels-disagree", lambda: RunConfig(model=ModelConfig(in_channels=3, out_channels=3)),
     ["in_channels = 3", "the data's 1 channel(s)"]),
    ("spacing", lambda: SampleConfig(spacing="karras"), ["spacing = 'karras'", "uniform, logsnr"]),
    ("sampler-name", lambda: SampleConfig(sampler="euler"), ["sampler = 'euler'", "dpmpp2m"]),
    ("clip-name", lambda: SampleConfig(clip="yes"), ["clip = 'yes'", "auto, on, off"]),
    ("dpm-steps-over-T", lambda: SampleConfig(sampler="dpmpp2m", steps=21).resolved_steps(20),
     ["steps = 21", "between 1 and T = 20"]),
    ("ddpm-fewer-steps", lambda: SampleConfig(sampler="ddpm", steps=5).resolved_steps(20),
     ["steps = 5", "use ddim or dpmpp2m"]),
    ("eta-negative", lambda: SampleConfig(eta=-0.1), ["eta = -0.1", "at least 0"]),
    ("eta-nan", lambda: SampleConfig(eta=math.nan), ["eta = nan", "finite number"]),
    ("n-zero", lambda: SampleConfig(n=0), ["n = 0", "at least 1"]),
    ("n-negative", lambda: SampleConfig(n=-4), ["n = -4", "at least 1"]),
    ("n-absurd", lambda: SampleConfig(n=10**9), ["n = 1000000000", "at most 10000"]),
    ("unknown-model", lambda: ModelConfig(name="transformer"), ["model = 'transformer'", "unet, improved_unet"]),
    ("unknown-optimizer", lambda: TrainConfig(optimizer="sgd"), ["optimizer = 'sgd'", "adam, adamw"]),
    ("unknown-dataset", lambda: DataConfig(dataset="imagenet"), ["dataset = 'imagenet'", "fashion_mnist, mnist, cifar10, folder"]),
    ("image-size-not-multiple-of-4", lambda: DataConfig(image_size=30), ["image_size = 30", "multiple of 4"]),
    ("image-size-too-large", lambda: DataConfig(image_size=128), ["image_size = 128", "at most 64"]),
    ("image-size-too-small", lambda: DataConfig(image_size=8), ["image_size = 8", "at least 16"]),
    ("channels-two", lambda: DataConfig(channels=2), ["channels = 2", "1 (grayscale) or 3 (colour)"]),
    ("folder-without-dir", lambda: DataConfig(dataset="folder"), ["data_dir = ''", "--data-dir PATH"]),
    ("one-class-name", lambda: DataConfig(dataset="folder", data_dir="x", class_names=("a",)),
     ["class_names", "none (unlabelled) or 2"]),
    ("unknown-sampler", lambda: SampleConfig(sampler="euler"), ["sampler = 'euler'", "ddpm, ddim"]),
    ("unknown-device-config", lambda: TrainConfig(device="tpu"), ["device = 'tpu'", "auto, cpu, cuda, mps"]),
    ("unknown-device-resolve", lambda: resolve_device("tpu"), ["device = 'tpu'", "auto, cpu, cuda, mps"]),
    ("unknown-preset", lambda: preset("huge"), ["preset = 'huge'", "book"]),
    ("unknown-setting", lambda: override(preset("book"), learning_rate=1e-3), ["'learning_rate'"]),
    ("channel-mults-not-a-list", lambda: ModelConfig(channel_mults=2), ["channel_mults = 2", "list"]),
    ("betas-not-a-pair", lambda: TrainConfig(betas=0.9), ["betas = 0.9", "two numbers"]),
    ("name-slash", lambda: check_run_name("a/b"), ["name = 'a/b'", "no '/'"]),
    ("name-dotdot", lambda: check_run_name(".."), ["name = '..'", "no '..'"]),
    ("name-space", lambda: check_run_name("my run"), ["name = 'my run'", "A-Z a-z 0-9 . _ -"]),
    ("name-newline", lambda: check_run_name("run\n"), ["name = 'run\\n'", "A-Z a-z 0-9 . _ -"]),
    ("name-unicode", lambda: check_run_name("läuft"), ["name = 'läuft'", "A-Z a-z 0-9 . _ -"]),
]


@pytest.mark.parametrize("call, expected", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_rejects_with_field_value_and_rule(call, expected):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"


@needs_no_cuda
@pytest.mark.parametrize("where", ["resolve_device", "load_model", "sample", "train_run"])
def test_api_cuda_where_there_is_none(where, tmp_path):
    expected = "device = 'cuda' is not allowed: no CUDA GPU is visible"
    with pytest.raises(ConfigError, match=expected):
        if where == "resolve_device":
            resolve_device("cuda")
        elif where == "load_model":
            runs.load_model(_tiny_trained_run(tmp_path), device="cuda")
        elif where == "sample":
            model = build_model(tiny_config().model)
            sample(model, NoiseScheduler(ScheduleConfig(timesteps=10)), SampleConfig(n=1), device="cuda")
        else:
            run = runs.create_run(tmp_path, "gpu", tiny_config(device="cuda"))
            train_run(run, images=make_tiny_images(64))
    if where == "train_run":  # the run is marked failed with the same message, not left "running"
        status = runs.read_status(tmp_path / "gpu")
        assert status["state"] == "failed" and expected in status["error"]


def test_api_batch_larger_than_the_images_given(tmp_path):
    run = runs.create_run(tmp_path, "big", tiny_config(batch_size=100))
    with pytest.raises(ConfigError, match=r"batch_size = 100 is not allowed: it exceeds the 64 training images"):
        train_run(run, images=make_tiny_images(64))
    assert runs.read_status(run)["state"] == "failed"


@pytest.mark.parametrize("images, shown", [
    (torch.rand(64, 1, 28, 28), "torch.float32 (64, 1, 28, 28)"),        # floats in [0, 1]: would train on black
    (torch.zeros(64, 1, 28, 27, dtype=torch.uint8), "torch.uint8 (64, 1, 28, 27)"),  # wrong size
    (torch.zeros(64, 28, 28, dtype=torch.uint8), "torch.uint8 (64, 28, 28)"),  # the old layout, no channel axis
], ids=["float-pixels", "wrong-shape", "no-channel-axis"])
def test_api_images_that_are_not_uint8_28x28(tmp_path, images, shown):
    run = runs.create_run(tmp_path, "imgs", tiny_config())
    bad = ImageSet(images=images, labels=torch.zeros(64, dtype=torch.int64), dataset="fashion_mnist",
                   split="train")
    expected = f"images = {shown} is not allowed: training expects uint8 images of shape (N, 1, 28, 28)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        train_run(run, images=bad)
    assert runs.read_status(run)["state"] == "failed"


def test_api_config_round_trip_keeps_validating():
    """from_dict runs the same checks as the constructors: JSON cannot smuggle a bad value in."""
    data = tiny_config().to_dict()
    data["train"]["lr"] = -1.0
    with pytest.raises(ConfigError, match=r"lr = -1.0 is not allowed"):
        RunConfig.from_dict(data)
    assert RunConfig.from_dict(tiny_config().to_dict()) == tiny_config()


# -- the CLI -------------------------------------------------------------------------------------------
# Every train case starts from tiny, valid flags; the case's own flags come last and win.
TINY_TRAIN = ["--model", "improved_unet", "--base-channels", "8", "--channel-mults", "1", "2", "--attention", "off",
              "--timesteps", "10", "--limit-images", "64", "--batch-size", "32", "--max-steps", "1",
              "--device", "cpu", "--name", "new", "--quiet"]

TRAIN_CASES = [
    # (id, extra flags, substrings of the one stderr line)
    ("lr-zero", ["--lr", "0"], ["lr = 0.0 is not allowed", "greater than 0"]),
    ("lr-not-a-number", ["--lr", "fast"], ["--lr", "'fast' is not a number"]),
    ("lr-nan", ["--lr", "nan"], ["lr = nan is not allowed", "finite number"]),
    ("lr-inf", ["--lr", "inf"], ["lr = inf is not allowed", "finite number"]),
    ("weight-decay-negative", ["--weight-decay", "-0.1"], ["weight_decay = -0.1 is not allowed", "at least 0"]),
    ("batch-zero", ["--batch-size", "0"], ["batch_size = 0 is not allowed", "at least 1"]),
    ("batch-over-images", ["--batch-size", "100"], ["batch_size = 100 is not allowed", "64 images"]),
    ("epochs-and-steps-zero", ["--epochs", "0", "--max-steps", "0"], ["epochs = 0 is not allowed", "max_steps"]),
    ("timesteps-one", ["--timesteps", "1"], ["timesteps = 1 is not allowed", "at least 2"]),
    ("unknown-model", ["--model", "transformer"], ["--model", "'transformer'", "unet"]),
    ("unknown-optimizer", ["--optimizer", "sgd"], ["--optimizer", "'sgd'", "adamw"]),
    ("unknown-dataset", ["--dataset", "imagenet"], ["--dataset", "'imagenet'", "fashion_mnist"]),
    ("image-size-not-allowed", ["--image-size", "30"], ["image_size = 30 is not allowed", "multiple of 4"]),
    ("folder-missing", ["--dataset", "folder", "--data-dir", "/no/such/folder"],
     ["data_dir = '/no/such/folder' is not allowed", "no such folder"]),
    ("unknown-device", ["--device", "tpu"], ["--device", "'tpu'", "cpu"]),
    ("name-slash", ["--name", "a/b"], ["name = 'a/b' is not allowed", "no '/'"]),
    ("name-dotdot", ["--name", "../escape"], ["name = '../escape' is not allowed"]),
    ("name-characters", ["--name", "my run!"], ["name = 'my run!' is not allowed", "A-Z a-z 0-9 . _ -"]),
    ("name-exists", ["--name", "keep"], ["name = 'keep' is not allowed", "exists", "--resume"]),
    ("resume-fixed-flag", ["--name", "keep", "--resume", "--lr", "0.1"], ["--lr cannot change on --resume"]),
]
if NO_CUDA:
    TRAIN_CASES += [
        ("cuda-missing", ["--device", "cuda"], ["device = 'cuda' is not allowed", "no CUDA GPU"]),
        # a resume moved to a missing GPU must be refused before it rewrites the run's config.json
        ("resume-cuda-missing", ["--name", "keep", "--resume", "--device", "cuda"], ["device = 'cuda'"]),
    ]

SAMPLE_CASES = [
    ("n-zero", ["--n", "0"], ["n = 0 is not allowed", "at least 1"]),
    ("n-absurd", ["--n", "1000000"], ["n = 1000000 is not allowed", "at most 10000"]),
    ("ddim-steps-over-T", ["--sampler", "ddim", "--steps", "50"], ["steps = 50 is not allowed", "T = 10"]),
    ("ddim-steps-negative", ["--sampler", "ddim", "--steps", "-1"], ["steps = -1 is not allowed"]),
    ("eta-negative", ["--sampler", "ddim", "--eta", "-0.5"], ["eta = -0.5 is not allowed", "at least 0"]),
    ("unknown-sampler", ["--sampler", "euler"], ["--sampler", "'euler'", "ddim"]),
    ("dpm-steps-over-T", ["--sampler", "dpmpp2m", "--steps", "11"], ["steps = 11 is not allowed", "T = 10"]),
    ("dpm-steps-zero-is-T", ["--sampler", "dpmpp2m-sde", "--steps", "-3"], ["steps = -3 is not allowed"]),
    ("unknown-spacing", ["--sampler", "dpmpp2m", "--spacing", "karras"], ["--spacing", "'karras'", "logsnr"]),
    ("unknown-clip", ["--clip", "maybe"], ["--clip", "'maybe'", "auto"]),
    ("steps-not-a-number", ["--sampler", "dpmpp2m", "--steps", "ten"], ["--steps", "'ten' is not a whole number"]),
    ("missing-run", ["--run", "{tmp}/no-such-run"], ["no such run folder"]),
    # refused before sampling starts, not after minutes of it when the file is written
    ("npy-folder-missing", ["--npy", "{tmp}/no-such-folder/x.npy"], ["--npy = ", "does not exist"]),
]
if NO_CUDA:
    SAMPLE_CASES.append(("cuda-missing", ["--device", "cuda"], ["device = 'cuda' is not allowed"]))


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_DATA_ROOT": str(REPO / "data")}
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def _tiny_trained_run(root: Path) -> Path:
    run = runs.create_run(root, "trained", replace(tiny_config(max_steps=2),
                                                   schedule=ScheduleConfig(timesteps=10)))
    train_run(run, images=make_tiny_images(64))
    return run


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Runs every CLI case once, in this process, before the checks.

    Train cases each get their own runs folder holding one existing run, `keep`, so a stray folder
    or a touched file is pinned on the case that made it.
    """
    root = tmp_path_factory.mktemp("cli")
    trained = _tiny_trained_run(root / "sample-runs")
    jobs = {}
    for case_id, flags, _ in TRAIN_CASES:
        runs_dir = root / f"train-{case_id}"
        runs.create_run(runs_dir, "keep", replace(tiny_config(), schedule=ScheduleConfig(timesteps=10)))
        base = ["--quiet"] if "--resume" in flags else TINY_TRAIN  # a resume takes its run's own settings
        jobs[("train", case_id)] = (["train", "--runs-dir", str(runs_dir), *base, *flags], runs_dir,
                                    _snapshot(runs_dir))
    for case_id, flags, _ in SAMPLE_CASES:
        flags = [f.replace("{tmp}", str(root)) for f in flags]
        jobs[("sample", case_id)] = (["sample", "--run", str(trained), "--device", "cpu", "--quiet", *flags],
                                     None, None)
    return {key: (run_core(*args), runs_dir, before) for key, (args, runs_dir, before) in jobs.items()}


def _assert_one_line_error(proc, expected: list[str]) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0], f"{part!r} missing from {lines[0]!r}"


@pytest.mark.parametrize("case_id, flags, expected", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_cli_train_rejects_in_one_line_and_leaves_runs_alone(cli_results, case_id, flags, expected):
    proc, runs_dir, before = cli_results[("train", case_id)]
    _assert_one_line_error(proc, expected)
    assert sorted(p.name for p in runs_dir.iterdir()) == ["keep"], "a rejected train left a folder behind"
    assert _snapshot(runs_dir) == before, "a rejected train touched an existing run"


def test_cli_rejects_as_a_real_process(tmp_path):
    """The table above runs main() in this process; here the process boundary itself: a real
    `python -m core` exits 2 with one line and no traceback, and a rejected train leaves the runs alone."""
    case_id, flags, expected = TRAIN_CASES[0]
    runs_dir = tmp_path / "runs"
    runs.create_run(runs_dir, "keep", replace(tiny_config(), schedule=ScheduleConfig(timesteps=10)))
    before = _snapshot(runs_dir)
    _assert_one_line_error(_cli(["train", "--runs-dir", str(runs_dir), *TINY_TRAIN, *flags]), expected)
    assert _snapshot(runs_dir) == before and sorted(p.name for p in runs_dir.iterdir()) == ["keep"]
    missing = ["sample", "--run", str(tmp_path / "no-such-run"), "--device", "cpu", "--quiet"]
    _assert_one_line_error(_cli(missing), ["no such run folder"])


@pytest.mark.parametrize("case_id, flags, expected", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_cli_sample_rejects_in_one_line(cli_results, case_id, flags, expected):
    proc, _, _ = cli_results[("sample", case_id)]
    _assert_one_line_error(proc, expected)


EVAL_SWEEP_CASES = [
    ("unknown-sampler-in-sweep", ["--sweep-steps", "10", "--samplers", "ddim,euler"],
     ["samplers = 'euler' is not allowed", "dpmpp2m"]),
    ("ddpm-in-sweep", ["--sweep-steps", "10", "--samplers", "ddpm"], ["samplers = 'ddpm' is not allowed"]),
    ("samplers-without-sweep", ["--samplers", "ddim"], ["--samplers needs --sweep-steps"]),
    ("empty-sweep", ["--sweep-steps", ","], ["--sweep-steps", "is empty"]),
    ("sweep-not-numbers", ["--sweep-steps", "10,many"], ["--sweep-steps", "'many' is not a whole number"]),
]


@pytest.mark.parametrize("case_id,flags,expected", EVAL_SWEEP_CASES, ids=[c[0] for c in EVAL_SWEEP_CASES])
def test_cli_eval_sweep_rejects_in_one_line_before_any_work(tmp_path, case_id, flags, expected):
    result = run_core("eval", "--run", str(tmp_path / "no-such-run"), "--n", "64", *flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(text in lines[0] for text in expected), lines[0]
