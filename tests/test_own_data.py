"""Your own images: folders read like the built-in data, every bad folder refused in one line, the cache
verified, colour runs trained and sampled with every sampler, and the shipped runs unchanged."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from core.cli import main as cli
from core.config import PRESETS, SAMPLER_NAMES, DataConfig, ModelConfig, RunConfig, SampleConfig, override
from core.data import cache as data_cache
from core.data.datasets import DatasetNotFoundError, ImageSet, load_images
from core.data.folder import ImageFolderError, load_folder, resolve_data_config, scan_folder
from core.data.shapes import make_shapes_folder
from core.data.transforms import to_l_or_rgb
from core.diffusion.sampling import sample
from core.diffusion.schedule import NoiseScheduler
from core.models import build_model
from core.store import runs
from core.train.training import train_run
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(data_cache.ENV_CACHE_DIR, str(tmp_path / "cache"))


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode=mode).save(path)


def _error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


# -- FashionMNIST as a PNG folder trains exactly as the built-in dataset ----------------------------------
def test_fashion_mnist_png_class_folders_train_exactly_as_the_builtin(tmp_path):
    try:
        full = load_images("fashion_mnist", "train", download=False)
    except DatasetNotFoundError as exc:
        pytest.skip(str(exc))
    images, labels = full.images[:320], full.labels[:320]
    # ImageFolder order is class by class (sorted paths): the built-in images in that same order.
    order = torch.argsort(labels, stable=True)
    for rank, i in enumerate(order.tolist()):
        _png(tmp_path / "fm" / f"class{int(labels[i])}" / f"{rank:05d}.png", images[i, 0].numpy(), "L")
    builtin = ImageSet(images=images[order], labels=labels[order], dataset="fashion_mnist", split="train")
    data = resolve_data_config(DataConfig(dataset="folder", data_dir=str(tmp_path / "fm"), image_size=28, channels=1),
                               channels_given=False)
    assert data.channels == 1 and data.class_names == tuple(f"class{k}" for k in range(10))
    folder = load_folder(data)
    assert torch.equal(folder.images, builtin.images) and torch.equal(folder.labels, builtin.labels)

    base = override(PRESETS["tiny"], max_steps=20, log_every=1, limit_images=0, sample_every_epochs=0)
    losses = {}
    for name, config, given in (("builtin", base, builtin), ("folder", override(base, dataset="folder",
                                data_dir=data.data_dir, fingerprint=data.fingerprint, class_names=data.class_names,
                                image_size=28, channels=1), None)):
        run_dir = runs.create_run(tmp_path / "runs", name, config)
        train_run(run_dir, images=given)   # the folder run reads its own folder through its config
        losses[name] = [row["loss"] for row in runs.read_metrics(run_dir)]
    assert len(losses["builtin"]) == 20
    np.testing.assert_allclose(losses["folder"], losses["builtin"], rtol=1e-6, atol=1e-7)


# -- a labelled colour folder: train -> sample with every sampler, guided ---------------------------------
def test_shapes_folder_trains_and_samples_in_colour_with_every_sampler(tmp_path, capsys):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=40, size=32)
    runs_dir = tmp_path / "runs"
    assert cli.main(["data", "--dataset", "folder", "--data-dir", str(shapes)]) == 0
    shown = capsys.readouterr().out
    assert "120 images, colour" in shown and "3 classes: circle (40), square (40), triangle (40)" in shown
    assert cli.main(["train", "--preset", "tiny", "--dataset", "folder", "--data-dir", str(shapes), "--conditional",
                     "--max-steps", "4", "--hflip", "--runs-dir", str(runs_dir), "--name", "col", "--quiet"]) == 0
    saved = json.loads((runs_dir / "col" / "config.json").read_text())
    assert saved["format_version"] == 5 and saved["model"]["num_classes"] == 3
    assert {k: saved["data"][k] for k in ("dataset", "image_size", "channels", "hflip", "class_names")} == \
        {"dataset": "folder", "image_size": 32, "channels": 3, "hflip": True,
         "class_names": ["circle", "square", "triangle"]}
    with Image.open(runs_dir / "col" / "samples" / "final.png") as grid:
        assert grid.mode == "RGB"
    capsys.readouterr()
    for sampler in SAMPLER_NAMES:
        steps = [] if sampler == "ddpm" else ["--steps", "4"]
        npy = tmp_path / f"{sampler}.npy"
        assert cli.main(["sample", "--run", str(runs_dir / "col"), "--sampler", sampler, *steps, "--n", "3",
                         "--class", "square", "--guidance", "2", "--npy", str(npy), "--quiet"]) == 0, \
            capsys.readouterr().err
        assert np.load(npy).shape == (3, 3, 32, 32)
        assert "class square, guidance 2" in capsys.readouterr().out


@pytest.mark.parametrize("name, size, channels", [("unet", 16, 3), ("unet", 36, 1), ("improved_unet", 20, 3),
                                                   ("improved_unet", 64, 1)])
def test_both_networks_follow_the_run_shape(name, size, channels):
    model = build_model(ModelConfig(name=name, base_channels=8, channel_mults=(1, 2, 2), attention=True,
                                    in_channels=channels, out_channels=channels))
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([1, 5])).shape == x.shape


# -- bad folders: one line, exit 2, nothing created --------------------------------------------------------
def _folder_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no pictures")
    _png(tmp_path / "single" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "broken" / "b.jpg").write_bytes(b"")
    return {"empty": (empty, "no images in it"), "no-images": (tmp_path / "texts", "no images in it"),
            "file": (tmp_path / "single" / "a.png", "it is a file, not a folder"),
            "single-image": (tmp_path / "single", "a single image"),
            "all-unreadable": (tmp_path / "broken", "none of its 2 images could be read"),
            "missing": (tmp_path / "nowhere", "no such folder")}


@pytest.mark.parametrize("case", ["empty", "no-images", "file", "single-image", "all-unreadable", "missing"])
def test_bad_folders_are_refused_in_one_line_and_create_nothing(tmp_path, capsys, case):
    folder, expected = _folder_cases(tmp_path)[case]
    runs_dir = tmp_path / "runs"
    for argv in (["data", "--dataset", "folder", "--data-dir", str(folder)],
                 ["train", "--preset", "tiny", "--dataset", "folder", "--data-dir", str(folder),
                  "--runs-dir", str(runs_dir), "--name", "x", "--quiet"]):
        err = _error(capsys, argv)
        assert f"data_dir = {str(folder)!r} is not allowed" in err and expected in err
    assert not runs_dir.exists()


def test_unreadable_files_are_skipped_with_a_count_and_their_names(tmp_path, capsys):
    for i in range(3):
        _png(tmp_path / "mixed" / f"good{i}.png", np.full((8, 8), 40 * i, np.uint8))
    (tmp_path / "mixed" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n torn")
    assert cli.main(["data", "--dataset", "folder", "--data-dir", str(tmp_path / "mixed")]) == 0
    out = capsys.readouterr().out
    assert "3 images, grayscale" in out and "unlabelled" in out and "skipped 1 unreadable: bad.png (" in out


def test_decompression_bombs_are_skipped_not_decoded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # a 40x40 picture is now over PIL's limit
    _png(tmp_path / "bombs" / "big.png", np.zeros((40, 40), np.uint8))
    _png(tmp_path / "bombs" / "huge.png", np.zeros((40, 41), np.uint8))
    err = _error(capsys, ["data", "--dataset", "folder", "--data-dir", str(tmp_path / "bombs")])
    assert "over PIL's decompression-bomb limit" in err
    _png(tmp_path / "bombs" / "ok1.png", np.zeros((20, 20), np.uint8))
    _png(tmp_path / "bombs" / "ok2.png", np.zeros((20, 20), np.uint8))
    assert cli.main(["data", "--dataset", "folder", "--data-dir", str(tmp_path / "bombs")]) == 0
    assert "skipped 2 unreadable: big.png (over PIL's decompression-bomb limit)" in capsys.readouterr().out


def test_symlinks_out_of_the_folder_or_looping_are_not_followed(tmp_path):
    outside = tmp_path / "secret.png"
    _png(outside, np.full((8, 8), 255, np.uint8))
    root = tmp_path / "links"
    for i in range(2):
        _png(root / f"in{i}.png", np.zeros((8, 8), np.uint8))
    os.symlink(outside, root / "escape.png")
    os.symlink(root, root / "loop")                 # a folder linking to itself
    os.symlink(root / "in0.png", root / "alias.png")  # inside, to a regular file: followed
    scan = scan_folder(root)
    assert scan.files == ("alias.png", "in0.png", "in1.png")
    assert sorted(scan.skipped_links) == ["escape.png", "loop"]


def test_unusual_modes_convert_as_documented(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[0, 0, 3], rgba[1, 1, 3] = 200, 255, 0
    assert np.asarray(to_l_or_rgb(Image.fromarray(rgba, "RGBA")))[0, 0].tolist() == [200, 200, 200]
    assert np.asarray(to_l_or_rgb(Image.fromarray(rgba, "RGBA")))[1, 1].tolist() == [0, 0, 0]  # over black
    wide = Image.frombytes("I;16", (3, 1), np.array([0, 32768, 65535], "<u2").tobytes())
    assert np.asarray(to_l_or_rgb(wide)).tolist() == [[0, 127, 255]]
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert np.asarray(to_l_or_rgb(palette)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert to_l_or_rgb(cmyk).mode == "RGB" and np.asarray(to_l_or_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_a_folder_that_changed_refuses_resume_unless_allowed(tmp_path, capsys):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=12, size=16)
    runs_dir = tmp_path / "runs"
    base = ["train", "--preset", "tiny", "--runs-dir", str(runs_dir), "--name", "r", "--quiet"]
    assert cli.main([*base, "--dataset", "folder", "--data-dir", str(shapes), "--image-size", "16",
                     "--max-steps", "2"]) == 0
    before = (runs_dir / "r" / "config.json").read_bytes()
    _png(shapes / "circle" / "new.png", np.zeros((16, 16, 3), np.uint8))
    capsys.readouterr()
    err = _error(capsys, [*base, "--resume", "--max-steps", "3"])
    assert "the folder changed since the run was made" in err and "--allow-data-change" in err
    assert (runs_dir / "r" / "config.json").read_bytes() == before
    with pytest.raises(ImageFolderError, match="changed since the run was made"):  # the queue's and API's path
        train_run(runs_dir / "r", resume=True)
    assert cli.main([*base, "--resume", "--max-steps", "3", "--allow-data-change"]) == 0
    assert json.loads((runs_dir / "r" / "config.json").read_text())["data"]["fingerprint"] == scan_folder(shapes).fingerprint


def test_flags_that_do_not_fit_the_data_are_refused(tmp_path, capsys):
    flat = tmp_path / "flat"
    for i in range(4):
        _png(flat / f"{i}.png", np.full((8, 8), 60 * i, np.uint8))
    runs_dir = tmp_path / "runs"
    base = ["train", "--preset", "tiny", "--runs-dir", str(runs_dir), "--quiet"]
    assert "unlabelled" in _error(capsys, [*base, "--dataset", "folder", "--data-dir", str(flat), "--conditional"])
    assert "belongs to --dataset folder" in _error(capsys, [*base, "--data-dir", str(flat)])
    assert "multiple of 4" in _error(capsys, [*base, "--dataset", "folder", "--data-dir", str(flat),
                                              "--image-size", "18"])
    assert not runs_dir.exists()


# -- the decoded cache -------------------------------------------------------------------------------------
def test_the_cache_is_verified_and_rebuilt_when_damaged(tmp_path):
    shapes = make_shapes_folder(tmp_path / "shapes", per_class=5, size=24)
    data = resolve_data_config(DataConfig(dataset="folder", data_dir=str(shapes), image_size=16, channels=3))
    first = load_folder(data)
    scan = scan_folder(shapes)
    cached = data_cache.load_cached(scan.fingerprint, 16)
    assert cached is not None and cached.from_cache and torch.equal(cached.images, first.images)
    entry = data_cache.cache_root() / data_cache.entry_key(scan.fingerprint, 16)
    raw = bytearray((entry / "images.npy").read_bytes())
    raw[-1] ^= 0xFF
    (entry / "images.npy").write_bytes(bytes(raw))
    assert data_cache.load_cached(scan.fingerprint, 16) is None      # damaged: never trusted
    assert torch.equal(load_folder(data).images, first.images)       # decoded again, and rewritten
    assert data_cache.load_cached(scan.fingerprint, 16) is not None
    gray = load_folder(DataConfig(dataset="folder", data_dir=str(shapes), image_size=16, channels=1))
    assert gray.shape == (1, 16, 16)


# -- the shipped runs ---------------------------------------------------------------------------------------
# sha256 of 4 DDIM-5 samples (seed 3) drawn by the code before the data section existed, with per-image
# noise streams (the `diffusion` branch at 0e52e11, before the merge with the data section)
SHIPPED_SAMPLES = {
    "demo-improved-unet-adamw": "b596da46a7a48e46b69debed95b55944141c07dd97e401d7487f3d0e2a113956",
    "demo-book-unet-adam": "b574e01b0442fb34b4b2418d2f5c573f4625254661b92d82576cc71500481e42",
    "demo-improved-cfg": "6eba4a9a4a735e7482e62f5e6524a49e6f119c5869f5b4376bbe92e5ee5218fd",
}


def test_shipped_runs_read_as_28x28_grayscale_and_sample_unchanged():
    for path in sorted((REPO / "checkpoints").glob("*/config.json")):
        config = RunConfig.from_json(path.read_text())
        assert config.data == DataConfig(dataset="fashion_mnist", image_size=28, channels=1), path
    for name, digest in SHIPPED_SAMPLES.items():
        loaded = runs.load_model(REPO / "checkpoints" / name, use_ema=True, device="cpu")
        cfg = loaded.config
        extra = dict(labels=torch.arange(4) % 10, guidance=3.0) if cfg.model.num_classes else {}
        result = sample(loaded.model, NoiseScheduler(cfg.schedule), SampleConfig(sampler="ddim", steps=5, n=4, seed=3),
                        pixel_range=cfg.train.pixel_range, clip_default=cfg.train.clip_denoised,
                        prediction=cfg.train.prediction, shape=cfg.data.shape, **extra)
        assert result.images.shape == (4, 1, 28, 28)
        assert hashlib.sha256(np.ascontiguousarray(result.images).tobytes()).hexdigest() == digest, name


# -- the bench's figures (their values are reported, not asserted: the machine is shared) -------------------
def test_bench_reports_folder_loading_and_training_at_the_run_shape(capsys):
    assert cli.main(["bench", "--smoke", "--data-load", "30", "--image-size", "32", "--channels", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    load = result["data_load"]
    assert load["images"] == 30 and load["size"] == 32 and load["extrapolated"] is True
    assert set(load["targets"]) == {"first_load_50k_le_60s", "cached_load_50k_le_3s"}
    shaped = result["shaped_training"]
    assert shaped["shape"] == [3, 32, 32]
    for entry in shaped["train"].values():
        assert entry["train_gflop_per_image"] > 0 and 0 < entry["fraction_of_matmul"]
