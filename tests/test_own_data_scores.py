"""Scores for data that is not FashionMNIST: the classifier at any channel count, size and class count,
fitted per dataset fingerprint on a generated coloured-shapes folder; and the shipped FashionMNIST
classifier and its published figures unchanged."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.config import ConfigError
from core.data.datasets import ImageSet, load_images
from core.data.shapes import SHAPE_CLASSES, make_shapes_folder
from core.evaluation import classifier as clf
from core.evaluation.frechet import QualityEvaluator
from core.evaluation.own_data import fit_on_training_split, fitted_classifier, split_heldout

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "classifiers" / "fashion_mnist.safetensors"
SHIPPED_SHA256 = "e90b3d294d627de6b7964e1651d90a8d64d2609476dbbb686299ea1acec62262"
SHAPES_ACCURACY = 0.85   # what the fitted classifier must reach on held-out shapes (it measures ~0.95+)


def read_class_folder(root: Path, dataset: str = "shapes", split: str = "train") -> ImageSet:
    """A class folder read with PIL into uint8 (N, 3, H, W) and labels (the folder loader's job, later)."""
    images, labels = [], []
    for k, name in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        for png in sorted((root / name).glob("*.png")):
            with Image.open(png) as im:
                images.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
            labels.append(k)
    return ImageSet(images=torch.from_numpy(np.stack(images)).contiguous(), labels=torch.tensor(labels),
                    dataset=dataset, split=split)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[ImageSet, ImageSet]:
    root = tmp_path_factory.mktemp("shapes")
    train = read_class_folder(make_shapes_folder(root / "train", per_class=100, size=32, seed=0))
    test = read_class_folder(make_shapes_folder(root / "test", per_class=40, size=32, seed=1), split="test")
    return train, test


@pytest.fixture(scope="module")
def shapes_classifier(shapes, tmp_path_factory) -> clf.Classifier:
    directory = tmp_path_factory.mktemp("classifiers")
    return fit_on_training_split(shapes[0], SHAPE_CLASSES, directory,
                                 clf.FitConfig(batch_size=32, min_steps=150, lr=3e-3))


# -- the shipped classifier ---------------------------------------------------------------------------
def old_network() -> nn.Module:
    """The 28x28x1 network exactly as it was written before it took other shapes (arch version 1)."""
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.PixelUnshuffle(2), *block(4, 32), *block(32, 32), nn.MaxPool2d(2),
                                      *block(32, 64), *block(64, 64))
            self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128, bias=False), nn.BatchNorm1d(128),
                                       nn.ReLU(inplace=True))
            self.head = nn.Linear(128, 10)
    return Old()


def test_shipped_classifier_loads_and_gives_the_same_features():
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == SHIPPED_SHA256  # never rewritten
    loaded = clf.load_classifier("fashion_mnist")
    assert loaded.path == SHIPPED and loaded.model.image_shape == (1, 28, 28) and loaded.model.num_classes == 10
    assert loaded.class_names[9] == "Ankle boot" and loaded.fingerprint == ""
    old = old_network()
    old.load_state_dict(loaded.model.state_dict(), strict=True)  # same names, same shapes
    old.to(memory_format=torch.channels_last).eval()  # as load_classifier always placed it
    images = load_images("fashion_mnist", "test").images[:256]  # (N, 1, 28, 28)
    with torch.no_grad():
        expected = old.embed(old.body(images.float() / 127.5 - 1.0))
        assert torch.equal(loaded.model.features(images[:, 0]), expected)  # (N, 28, 28)
        assert torch.equal(loaded.model.features(images), expected)        # (N, 1, 28, 28)
    assert set(clf.read_metadata(SHIPPED.read_bytes())) >= {"dataset", "arch_version"}


def test_shipped_figures_are_unchanged():
    """README/docs: floor 0.664 at N = 1000 (seed 0) with the shipped classifier; the test statistics
    cache beside it still matches (same classifier, same test split)."""
    evaluator = QualityEvaluator(clf.load_classifier("fashion_mnist"), load_images("fashion_mnist", "test"))
    assert evaluator.stats_from_cache
    assert evaluator.floor(load_images("fashion_mnist", "train"), 1000, 0) == pytest.approx(0.664, abs=5e-4)


def test_a_28x28_classifier_file_keeps_the_old_metadata(tmp_path):
    model = clf.FeatureClassifier()
    saved = clf.save_classifier(clf.Classifier(model=model, dataset="fashion_mnist", test_accuracy=0.5),
                                tmp_path / "fashion_mnist.safetensors")
    meta = clf.read_metadata(saved.path.read_bytes())
    assert not {"channels", "image_size", "num_classes", "fingerprint"} & set(meta)


# -- other shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size,classes", [(3, 16, 2), (3, 32, 3), (1, 64, 7), (3, 64, 12)])
def test_the_network_takes_any_channel_count_size_and_class_count(channels, size, classes):
    model = clf.FeatureClassifier(channels, size, classes).eval()
    x = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
    assert model(x).shape == (2, classes) and model.features(x).shape == (2, 128)


@pytest.mark.parametrize("args,message", [((2, 32, 3), "channels = 2"), ((3, 30, 3), "image size = 30"),
                                          ((3, 68, 3), "image size = 68"), ((3, 32, 1), "num_classes = 1")])
def test_shapes_the_network_cannot_take_say_so(args, message):
    with pytest.raises(ConfigError, match=message):
        clf.FeatureClassifier(*args)


def test_wrong_image_shape_is_one_clear_line():
    with pytest.raises(ConfigError, match=r"reads \(N, 3, 32, 32\)"):
        clf.FeatureClassifier(3, 32, 3).prepare(torch.zeros((2, 1, 32, 32), dtype=torch.uint8))


def test_fitted_shapes_classifier_reaches_its_accuracy_and_is_stored_by_fingerprint(shapes, shapes_classifier):
    train, test = shapes
    assert shapes_classifier.test_accuracy >= SHAPES_ACCURACY          # on its held-out tenth
    assert clf.accuracy(shapes_classifier.model, test) >= SHAPES_ACCURACY  # on another generated folder
    path = shapes_classifier.path
    assert path.name == f"shapes-{clf.dataset_fingerprint(train, SHAPE_CLASSES)}.safetensors"
    again = fitted_classifier(train, SHAPE_CLASSES, path.parent)
    assert again is not None and again.class_names == SHAPE_CLASSES and again.sha256 == shapes_classifier.sha256
    x = test.images[:16]
    assert torch.equal(again.model.features(x), shapes_classifier.model.eval().features(x))
    # Other images (one fewer) have another fingerprint: no classifier for them yet.
    other = ImageSet(images=train.images[1:], labels=train.labels[1:], dataset="shapes", split="train")
    assert fitted_classifier(other, SHAPE_CLASSES, path.parent) is None
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == SHIPPED_SHA256


def test_frechet_floor_is_below_the_noise_ceiling_for_shapes(shapes, shapes_classifier):
    train, test = shapes
    evaluator = QualityEvaluator(shapes_classifier, test)
    n = 100
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(5))[:n]
    report = evaluator.evaluate(train.images[pick], train, seed=0)
    assert report.fd_floor < report.fd_noise / 5
    assert set(report.class_shares) == set(SHAPE_CLASSES) and report.class_entropy > 0.9


def test_split_heldout_is_seeded_and_disjoint(shapes):
    fit_part, held = split_heldout(shapes[0])
    assert len(held) == 30 and len(fit_part) == 270
    again, _ = split_heldout(shapes[0])
    assert torch.equal(again.images, fit_part.images)
    keys = {bytes(x.numpy().tobytes()) for x in fit_part.images}
    assert not any(bytes(x.numpy().tobytes()) in keys for x in held.images)


def test_a_planted_or_oversized_classifier_file_is_refused(tmp_path):
    target = tmp_path / "c"
    target.mkdir()
    (target / "fashion_mnist.safetensors").symlink_to(SHIPPED)
    with pytest.raises(clf.ClassifierError, match="not a regular file"):
        clf.load_classifier("fashion_mnist", target)
    big = tmp_path / "big" / "fashion_mnist.safetensors"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(clf.MAX_CLASSIFIER_BYTES + 1)
    with pytest.raises(clf.ClassifierError, match="under 64 MB"):
        clf.load_classifier("fashion_mnist", big.parent)
