"""The real FashionMNIST files, read through torchvision's dataset class into one uint8 tensor."""
from __future__ import annotations

import pytest
import torch

from core.data.datasets import DatasetNotFoundError, ensure_dataset, load_images, to_model_range, to_uint8

pytestmark = pytest.mark.integration


def test_fashion_mnist_loads_as_one_uint8_tensor():
    train = load_images("fashion_mnist", "train")
    test = load_images("fashion_mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10  # FashionMNIST is balanced
    assert train.class_names[9] == "Ankle boot"
    assert 60 < train.images.float().mean() < 80  # mean pixel of FashionMNIST is about 72.9


def test_pixel_ranges_round_trip():
    images = load_images("fashion_mnist", "test").images[:64]
    for pixel_range, lo, hi in (("unit", 0.0, 1.0), ("symmetric", -1.0, 1.0)):
        x = to_model_range(images, pixel_range)
        assert x.shape == (64, 1, 28, 28) and x.min() >= lo and x.max() <= hi
        assert torch.equal(to_uint8(x, pixel_range), images)


def test_missing_dataset_lists_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data here
    monkeypatch.delenv("DDPM_DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError) as err:
        ensure_dataset("mnist", tmp_path / "empty", download=False)
    message = str(err.value)
    assert "empty/MNIST/raw" in message and "data/MNIST/raw" in message and "--data-root" in message
