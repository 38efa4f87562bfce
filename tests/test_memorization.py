"""The memorization check: exact chunked nearest neighbours, the near-copy criterion, the pair grid,
and `eval --nearest` on trained runs."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import ConfigError
from core.data.shapes import make_shapes_folder
from core.evaluation import memorization as mem
from tests.conftest import make_tiny_images
from tests.test_evaluation import write_idx
from tests.test_own_data_scores import read_class_folder
from core.cli.main import main
from core.data.datasets import ImageSet
from core.store import runs


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    """300 generated 16x16 colour shapes for training, 60 more (another seed) held out."""
    root = tmp_path_factory.mktemp("shapes16")
    train = read_class_folder(make_shapes_folder(root / "train", per_class=100, size=16, seed=0))
    heldout = read_class_folder(make_shapes_folder(root / "heldout", per_class=20, size=16, seed=1))
    return train.images, heldout.images


@pytest.mark.parametrize("k", [1, 5])
def test_chunked_search_equals_brute_force(monkeypatch, k):
    monkeypatch.setattr(mem, "REFERENCE_CHUNK", 37)   # many chunks, a ragged last one
    monkeypatch.setattr(mem, "QUERY_CHUNK", 16)
    gen = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=gen)
    queries = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=gen)
    queries[:5] = reference[[3, 100, 299, 36, 37]]   # exact copies across chunk borders
    distances, indices = mem.nearest_neighbours(queries, reference, k)
    brute = torch.cdist(queries.reshape(50, -1).double() / 255, reference.reshape(300, -1).double() / 255,
                        compute_mode="donot_use_mm_for_euclid_dist")
    expected_d, expected_i = brute.topk(k, 1, largest=False)
    assert torch.equal(indices, expected_i)
    assert torch.allclose(distances, expected_d, atol=1e-12, rtol=0)
    assert indices[:5, 0].tolist() == [3, 100, 299, 36, 37] and distances[:5, 0].abs().max() == 0


def test_copy_ratio_is_nearest_over_mean_of_the_next():
    d = torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert mem.copy_ratios(d).tolist() == [pytest.approx(1 / 3), 0.0, 0.0]
    with pytest.raises(ConfigError, match="at least 2"):
        mem.copy_ratios(d[:, :1])


def test_copies_of_8_training_images_are_flagged_and_new_images_are_not(shapes16):
    train, heldout = shapes16
    small = train[::37][:8]                                   # 8 training images, all classes
    gen = torch.Generator().manual_seed(1)
    noisy = (small.repeat(4, 1, 1, 1).short() + torch.randint(-6, 7, (32, 3, 16, 16), generator=gen)).clamp(0, 255)
    copied = mem.check(noisy.to(torch.uint8), small, heldout)
    assert copied.copying and copied.near_copy_share == 1.0
    assert copied.pixels.heldout_near_copy_share == 0.0
    assert torch.equal(copied.nearest_index, torch.arange(8).repeat(4))
    # New images of the same kind against the full training set: no copies.
    new = mem.check(heldout, train, heldout)
    assert not new.copying and new.near_copy_share < mem.COPYING_SHARE


def test_report_is_finite_json_and_features_are_searched_too(shapes16):
    train, heldout = shapes16
    features = lambda x: x.float().mean(dim=(2, 3))           # noqa: E731 - any (N, D) embedding works
    report = mem.check(train[:20], train, heldout, features)
    out = report.to_dict()
    text = json.dumps(out, allow_nan=False)                   # finite numbers only
    assert out["features_near_copy_share"] == 1.0 and out["pixels_sample_nearest_median"] == 0.0
    assert out["n"] == 20 and out["train_images"] == 300 and out["heldout_images"] == 60
    assert "d1 < 0.3333 * mean(d2..d51)" in text


def test_bad_inputs_say_what_is_wrong(shapes16):
    train, heldout = shapes16
    with pytest.raises(ConfigError, match="training images shape"):
        mem.check(train[:4], train[:, :1], heldout)
    with pytest.raises(ConfigError, match="training images = 1"):
        mem.check(train[:4], train[:1], heldout)
    with pytest.raises(ConfigError, match="dtype"):
        mem.check(train[:4].float(), train, heldout)


def test_pair_grid_shows_each_sample_beside_its_nearest_training_image(shapes16):
    train, heldout = shapes16
    samples = torch.cat([train[[5, 9]], heldout[:2]])
    report = mem.check(samples, train, heldout)
    png = mem.pairs_grid_png(samples, train, report, per_row=4, scale=1)
    image = np.asarray(Image.open(io.BytesIO(png)))
    gap = 2
    assert image.shape == (16 + 2 * gap, 4 * (33 + gap) + gap, 3)
    first = image[gap:gap + 16, gap:gap + 33].transpose(2, 0, 1)   # the most copy-like pair first
    assert np.array_equal(first[:, :, :16], first[:, :, 17:])       # a copy: both halves the same
    assert (first[:, :, 16] == 255).all()                           # the white line between them


# -- eval --nearest on trained runs ---------------------------------------------------------------------
@pytest.fixture
def tiny_data_root(tmp_path, tiny_images):
    """FashionMNIST IDX files holding exactly what `tiny_run` trained on, and other images as the test split."""
    test = make_tiny_images(128, 7)
    return write_idx(tmp_path / "data", tiny_images, ImageSet(test.images, test.labels, "fashion_mnist", "test"))


def test_eval_nearest_on_a_trained_run_stores_the_entry_and_the_grid(tmp_path, tiny_run, tiny_data_root, capsys):
    """Real trained samples (a run of a few steps on 256 images): no copies, and everything is stored."""
    argv = ["eval", "--run", str(tiny_run), "--nearest", "--n", "16", "--sampler", "ddim", "--steps", "5",
            "--data-root", str(tiny_data_root), "--classifier-dir", str(tmp_path / "c"), "--quiet",
            "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    entry = json.loads(captured.out)
    assert entry["setting"] == "nearest-ddim-5" and entry["kind"] == "memorization" and entry["n"] == 16
    assert entry["train_images"] == 256 and entry["heldout_images"] == 16 and not entry["copying"]
    assert "near-copies" in captured.err
    stored = [e for e in runs.read_eval(tiny_run) if e.get("kind") == "memorization"]
    assert stored == [entry]
    json.dumps(stored, allow_nan=False)
    with Image.open(tiny_run / entry["grid"]) as grid:
        assert grid.mode == "L" and grid.size[0] > 28 * 2
    assert main(argv) == 0                      # again: replaces its entry, never duplicates
    assert len([e for e in runs.read_eval(tiny_run) if e.get("kind") == "memorization"]) == 1


@pytest.mark.parametrize("extra, message", [
    (["--real"], "--nearest needs --run"),
    (["--run", "x", "--fit-classifier"], "not both"),
    (["--run", "x", "--guidance", "3"], "leave out --guidance"),
    (["--run", "x", "--n", "1"], "n = 1 is not allowed"),
])
def test_eval_nearest_bad_inputs_end_in_one_line(tmp_path, extra, message, capsys):
    code = main(["eval", "--nearest", *extra, "--runs-dir", str(tmp_path), "--quiet",
                 "--data-root", str(tmp_path / "nodata")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())          # nothing created
