"""Sample-quality measurement: Fréchet distance, class shares, the classifier file, the eval CLI.

Fast tests run on tiny generated images (and tiny IDX files written in the torchvision layout, so
the CLI's real data path is exercised); one integration test uses the real FashionMNIST files.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from safetensors.torch import load, save

from core.evaluation import classifier as clf
from core.evaluation.classifier import read_metadata
from core.store import runs
from core.cli.main import main
from core.data.datasets import CLASS_NAMES, ImageSet
from core.evaluation.frechet import (QualityEvaluator, class_statistics, frechet_metric, noise_images,
                             normalised_entropy, real_subset)
from tests.conftest import make_tiny_images, tiny_config


# -- helpers -------------------------------------------------------------------------------------------
class Identity(nn.Module):
    """A 'feature network' that returns its input, so the metric sees vectors we control."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def exact_gaussian_sample(mean, cov, n: int, seed: int) -> torch.Tensor:
    """n points whose sample mean and (unbiased) sample covariance are exactly `mean` and `cov`."""
    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    z = torch.randn((n, len(mean)), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    whiten = torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1)))
    return (z @ whiten.T) @ torch.linalg.cholesky(cov).T + mean


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b) - 2 Tr sqrt(S_a^1/2 S_b S_a^1/2), with scipy's symmetric eigh.

    An independent route: torchmetrics takes eigenvalues of the non-symmetric S_a S_b instead. The
    symmetric form stays exact for singular covariances (dead ReLU features), where sqrtm warns.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)


def write_idx(root: Path, train: ImageSet, test: ImageSet) -> Path:
    """Tiny datasets as FashionMNIST IDX files, the layout torchvision reads."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, data in (("train", train), ("t10k", test)):
        n = len(data)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28)
                                                          + data.images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n)
                                                          + data.labels.to(torch.uint8).numpy().tobytes())
    return root


def tiny_split(split: str, n: int, seed: int) -> ImageSet:
    images = make_tiny_images(n, seed)
    return ImageSet(images=images.images, labels=images.labels, dataset="fashion_mnist", split=split)


@pytest.fixture(scope="module")
def tiny_classifier() -> clf.Classifier:
    """Fitted for 15 steps on rectangles: enough to make features that separate them."""
    return clf.fit(tiny_split("train", 512, 1), tiny_split("test", 128, 2),
                   clf.FitConfig(epochs=1, batch_size=32, max_steps=15, lr=3e-3))


# -- Fréchet distance ----------------------------------------------------------------------------------
def test_frechet_distance_matches_the_closed_form_for_two_gaussians():
    # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 5 + 6 = 11.
    var_a, var_b = [1.0, 4.0, 9.0, 1.0], [4.0, 1.0, 1.0, 1.0]
    a = exact_gaussian_sample([0, 0, 0, 0], torch.diag(torch.tensor(var_a)), 50, seed=0)
    b = exact_gaussian_sample([1, 0, 2, 0], torch.diag(torch.tensor(var_b)), 70, seed=1)
    metric = frechet_metric(Identity(4))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert float(metric.compute()) == pytest.approx(11.0, abs=1e-8)


def test_frechet_distance_agrees_with_scipy_for_correlated_features():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn((300, 6), generator=gen, dtype=torch.float64) @ torch.randn((6, 6), generator=gen, dtype=torch.float64)
    b = torch.randn((200, 6), generator=gen, dtype=torch.float64) * 2 + 0.5
    metric = frechet_metric(Identity(6))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert float(metric.compute()) == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-9)


def test_evaluator_distance_matches_scipy_on_classifier_features(tiny_classifier):
    test = tiny_split("test", 300, 5)
    evaluator = QualityEvaluator(tiny_classifier, test)
    fake = noise_images(64, seed=1)
    extract = clf.FeatureExtractor(tiny_classifier.model)
    expected = scipy_frechet(extract(test.images).double().numpy(), extract(fake).double().numpy())
    assert evaluator.frechet_distance(fake) == pytest.approx(expected, rel=1e-4)


def test_identical_sets_are_at_distance_zero_and_noise_is_far(tiny_classifier):
    test = tiny_split("test", 300, 5)
    evaluator = QualityEvaluator(tiny_classifier, test)
    noise = evaluator.noise_ceiling(300, seed=0)
    assert evaluator.frechet_distance(test.images) < 1e-6 * noise
    train = tiny_split("train", 400, 6)
    floor = evaluator.floor(train, 100, seed=0)
    assert 0 < floor < noise / 10


# -- class shares ----------------------------------------------------------------------------------------
def test_class_statistics_math():
    names = tuple("abcdefghij")
    uniform_picks = torch.eye(10) * 50.0                     # one confident vote for each class
    stats = class_statistics(uniform_picks, names)
    assert stats["class_shares"] == {n: 0.1 for n in names}
    assert stats["class_entropy"] == pytest.approx(1.0)
    assert stats["mean_confidence"] == pytest.approx(1.0)

    two = torch.zeros((4, 10))
    two[:2, 3] = 1.0                                          # p(top) = e / (e + 9)
    two[2:, 7] = 1.0
    stats = class_statistics(two, names)
    assert stats["class_shares"]["d"] == 0.5 and stats["class_shares"]["h"] == 0.5
    assert stats["class_entropy"] == pytest.approx(math.log(2) / math.log(10))
    assert stats["mean_confidence"] == pytest.approx(math.e / (math.e + 9))
    assert normalised_entropy(torch.tensor([0.0, 1.0, 0.0])) == 0.0


def test_noise_images_follow_the_documented_definition():
    images = noise_images(2000, seed=4)
    assert images.dtype == torch.uint8 and images.shape == (2000, 1, 28, 28)
    assert torch.equal(images, noise_images(2000, seed=4))
    saturated = ((images == 0) | (images == 255)).double().mean()
    assert float(saturated) == pytest.approx(0.3173, abs=0.01)  # P(|z| > 1) for z ~ N(0, 1)


def test_bad_inputs_are_named():
    evaluator_images = torch.zeros((1, 28, 28), dtype=torch.uint8)
    with pytest.raises(clf.ConfigError, match="n = 1"):
        from core.evaluation.frechet import _check_images
        _check_images(evaluator_images, "images")
    with pytest.raises(clf.ConfigError, match="n = 500"):
        real_subset(tiny_split("train", 100, 0), 500)
    with pytest.raises(clf.ConfigError, match="epochs"):
        clf.FitConfig(epochs=0)
    with pytest.raises(clf.ConfigError, match="dtype"):
        clf.FeatureClassifier().prepare(torch.zeros((2, 28, 28)))


# -- the classifier file ---------------------------------------------------------------------------------
def test_classifier_round_trips_through_safetensors(tmp_path, tiny_classifier):
    path = clf.classifier_path("fashion_mnist", tmp_path)
    clf.save_classifier(tiny_classifier, path)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, nothing pickled
    loaded = clf.load_classifier("fashion_mnist", tmp_path)
    assert loaded.test_accuracy == pytest.approx(tiny_classifier.test_accuracy, abs=1e-6)
    assert loaded.sha256 == tiny_classifier.sha256 and len(loaded.sha256) == 64
    meta = clf.read_metadata(path.read_bytes())
    assert meta["dataset"] == "fashion_mnist" and meta["arch_version"] == str(clf.ARCH_VERSION)
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES["fashion_mnist"])
    images = make_tiny_images(16, 9).images
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), tiny_classifier.model.eval()(images), atol=1e-5)


def test_classifier_problems_say_how_to_fit(tmp_path, tiny_classifier):
    with pytest.raises(clf.ClassifierNotFoundError, match="--fit-classifier --dataset fashion_mnist"):
        clf.load_classifier("fashion_mnist", tmp_path)
    path = clf.classifier_path("fashion_mnist", tmp_path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(clf.ClassifierError, match="damaged"):
        clf.load_classifier("fashion_mnist", tmp_path)
    clf.save_classifier(tiny_classifier, path)
    path.rename(clf.classifier_path("mnist", tmp_path))
    with pytest.raises(clf.ClassifierError, match="fitted on 'fashion_mnist'"):
        clf.load_classifier("mnist", tmp_path)


def test_test_statistics_are_cached_per_classifier(tmp_path, tiny_classifier):
    clf.save_classifier(tiny_classifier, clf.classifier_path("fashion_mnist", tmp_path))
    test = tiny_split("test", 200, 5)
    first = QualityEvaluator(tiny_classifier, test)
    assert not first.stats_from_cache and first.cache_path.is_file()
    second = QualityEvaluator(clf.load_classifier("fashion_mnist", tmp_path), test)
    assert second.stats_from_cache
    fake = noise_images(50, seed=2)
    assert second.frechet_distance(fake) == pytest.approx(first.frechet_distance(fake), rel=1e-9)
    other_test = tiny_split("test", 200, 6)  # another test split must not reuse the statistics
    assert not QualityEvaluator(tiny_classifier, other_test).stats_from_cache


@pytest.mark.parametrize("missing", ["feature_sum", "feature_outer_sum", "count"])
def test_a_cache_missing_a_key_is_recomputed_not_half_loaded(tmp_path, tiny_classifier, missing):
    """A cache that lacks one state must leave the metric untouched, so the statistics are computed
    once from the test split, never added on top of half-loaded ones (which doubled them)."""
    clf.save_classifier(tiny_classifier, clf.classifier_path("fashion_mnist", tmp_path))
    test = tiny_split("test", 200, 5)
    first = QualityEvaluator(tiny_classifier, test)
    fake = noise_images(50, seed=2)
    expected = first.frechet_distance(fake)
    blob = first.cache_path.read_bytes()
    tensors = {k: v for k, v in load(blob).items() if k != missing}
    first.cache_path.write_bytes(save(tensors, metadata=read_metadata(blob)))
    again = QualityEvaluator(clf.load_classifier("fashion_mnist", tmp_path), test)
    assert not again.stats_from_cache
    assert int(again.metric.real_features_num_samples) == 200
    assert again.frechet_distance(fake) == pytest.approx(expected, rel=1e-9)


# -- the CLI ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_data_root(tmp_path) -> Path:
    return write_idx(tmp_path / "data", tiny_split("train", 256, 11), tiny_split("test", 128, 12))


def test_eval_cli_writes_eval_json_entries_per_setting(tmp_path, tiny_run, tiny_data_root, tiny_classifier, capsys):
    classifiers = tmp_path / "classifiers"
    clf.save_classifier(tiny_classifier, clf.classifier_path("fashion_mnist", classifiers))
    common = ["--n", "12", "--seed", "1", "--batch-size", "12", "--device", "cpu", "--quiet",
              "--classifier-dir", str(classifiers), "--data-root", str(tiny_data_root)]
    assert main(["eval", "--run", str(tiny_run), "--sampler", "ddim", "--steps", "5", *common]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["setting"] == "ddim-5" and entry["n"] == 12 and entry["weights"] == "ema"
    assert entry["fd"] >= 0 and entry["fd_floor"] >= 0 and entry["fd_noise"] > entry["fd_floor"]
    assert entry["fd_ratio"] == pytest.approx(entry["fd"] / entry["fd_floor"], rel=1e-3)
    assert set(entry["class_shares"]) == set(CLASS_NAMES["fashion_mnist"])
    assert sum(entry["class_shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= entry["class_entropy"] <= 1 and 0.1 <= entry["mean_confidence"] <= 1
    assert entry["classifier_accuracy"] == pytest.approx(tiny_classifier.test_accuracy, abs=1e-4)
    assert entry["classifier_sha256"] == tiny_classifier.sha256[:12]

    assert main(["eval", "--run", str(tiny_run), "--sampler", "ddpm", *common]) == 0
    stored = json.loads((tiny_run / "eval.json").read_text())
    assert [e["setting"] for e in stored] == ["ddim-5", "ddpm-20"]
    assert stored[0] == entry


def test_eval_cli_fits_a_missing_classifier_then_reports_real_references(tmp_path, tiny_data_root, capsys):
    classifiers = tmp_path / "classifiers"
    args = ["eval", "--real", "--n", "64", "--device", "cpu", "--quiet", "--fit-epochs", "2",
            "--classifier-dir", str(classifiers), "--data-root", str(tiny_data_root)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "fitting it now" in captured.err and "--fit-classifier --dataset fashion_mnist" in captured.err
    out = json.loads(captured.out)
    assert out["n"] == 64 and 0 <= out["fd_floor"] < out["fd_noise"]
    assert (classifiers / "fashion_mnist.safetensors").is_file()
    assert (classifiers / "fashion_mnist.test-stats.safetensors").is_file()
    assert main(args) == 0  # second time: loaded, not fitted
    assert "fitting" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "exactly one of --run NAME, --fit-classifier or --real"),
    (["--real", "--fit-classifier"], "got --fit-classifier and --real"),
    (["--run", "no-such-run"], "no-such-run"),
    (["--real", "--n", "1"], "n = 1 is not allowed"),
])
def test_eval_cli_bad_inputs_end_in_one_line(tmp_path, argv, message, capsys):
    code = main(["eval", *argv, "--runs-dir", str(tmp_path), "--classifier-dir", str(tmp_path / "c"),
                 "--data-root", str(tmp_path / "nodata"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_eval_cli_rejects_a_dataset_other_than_the_runs(tmp_path, capsys):
    run_dir = runs.create_run(tmp_path, "untrained", tiny_config())  # checked before any weights load
    assert main(["eval", "--run", str(run_dir), "--dataset", "mnist", "--quiet"]) == 2
    assert "was trained on 'fashion_mnist'" in capsys.readouterr().err


# -- the real dataset --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_real_floor_is_far_below_the_noise_ceiling():
    from core.data.datasets import load_images
    train = load_images("fashion_mnist", "train")
    full_test = load_images("fashion_mnist", "test")
    test = ImageSet(full_test.images[:2000], full_test.labels[:2000], "fashion_mnist", "test")
    quick = clf.fit(train, test, clf.FitConfig(batch_size=128, max_steps=60, lr=3e-3))
    assert quick.test_accuracy > 0.6  # 60 steps: far from the 91 % of a real fit, far above chance
    evaluator = QualityEvaluator(quick, test)
    floor, ceiling = evaluator.floor(train, 200, seed=0), evaluator.noise_ceiling(200, seed=0)
    assert floor < ceiling / 5
    stats = evaluator.class_statistics(real_subset(train, 200, seed=0))
    assert stats["class_entropy"] > 0.9  # the training split is balanced


def test_eval_entries_of_another_n_or_classifier_are_kept(tmp_path):
    """One entry per (setting, N, classifier): re-evaluating replaces, a figure at another N is kept."""
    run = tmp_path / "r"
    run.mkdir()
    base = {"setting": "ddpm-1000", "n": 1000, "classifier_sha256": "aaa", "fd": 4.0}
    runs.append_eval(run, base)
    runs.append_eval(run, {**base, "n": 250, "fd": 5.0})
    runs.append_eval(run, {**base, "classifier_sha256": "bbb", "fd": 6.0})
    runs.append_eval(run, {**base, "fd": 3.9})  # the same measurement again: replaces the first
    assert sorted((e["n"], e["classifier_sha256"], e["fd"]) for e in runs.read_eval(run)) == \
        [(250, "aaa", 5.0), (1000, "aaa", 3.9), (1000, "bbb", 6.0)]
