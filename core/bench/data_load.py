"""`python -m core bench --data-load N` and `--image-size/--channels/--dataset`: own-data figures.

How fast a folder of N generated 32x32 RGB PNGs becomes a tensor.

Two figures, measured in one run on the same folder: the first load (scan, decode every file, write
the verified cache) and the second (scan, read and verify the cache). The folder is written by the
coloured-shapes generator (core.data.shapes) into a temporary folder, which is removed afterwards; its
writing is timed too but is no part of either figure. Targets from issue 20: 50,000 images in <= 60 s
the first time and <= 3 s from the cache on 2 CPU cores. Reported, never asserted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..config import PRESETS, DataConfig, override
from ..device import resolve_device
from ..data.cache import cache_root
from ..data.folder import load_folder, resolve_data_config
from ..data.shapes import make_shapes_folder
from .runner import BENCH_VERSION, MODEL_PRESETS, PeakMemory, _load_average, matmul_gflops, measure_training, \
    plan_of, print_result

TARGET_FIRST_S_PER_50K = 60.0
TARGET_CACHED_S_PER_50K = 3.0
FULL_IMAGES = 50_000


def measure_data_load(n_images: int, size: int = 32, workdir: str | Path | None = None) -> dict:
    """Seconds to write, first load and cached load a generated folder of about `n_images` PNGs."""
    per_class = max(1, n_images // 3)
    root = Path(tempfile.mkdtemp(prefix="bench-data-", dir=workdir))
    try:
        start = time.perf_counter()
        folder = make_shapes_folder(root / "shapes", per_class=per_class, size=size)
        written_s = time.perf_counter() - start
        cache = root / "cache"
        start = time.perf_counter()
        data = resolve_data_config(DataConfig(dataset="folder", data_dir=str(folder), image_size=size, channels=3),
                                   cache_dir=cache)
        first = load_folder(data, cache_dir=cache)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        again = load_folder(data, cache_dir=cache)
        cached_s = time.perf_counter() - start
        assert again.images.shape == first.images.shape  # the cache returned the whole set
        n = len(first)
        scale = FULL_IMAGES / n   # the targets are for 50,000 images; both loads are linear in N
        cache_bytes = sum(p.stat().st_size for p in cache_root(cache).rglob("*") if p.is_file())
        return {"images": n, "size": size, "channels": 3, "write_s": round(written_s, 2),
                "first_load_s": round(first_s, 2), "cached_load_s": round(cached_s, 3),
                "first_load_images_per_s": round(n / first_s, 1), "cache_mb": round(cache_bytes / 1e6, 1),
                "first_load_s_per_50k": round(first_s * scale, 1), "cached_load_s_per_50k": round(cached_s * scale, 2),
                "extrapolated": n != FULL_IMAGES,
                "targets": {"first_load_50k_le_60s": first_s * scale <= TARGET_FIRST_S_PER_50K,
                            "cached_load_50k_le_3s": cached_s * scale <= TARGET_CACHED_S_PER_50K}}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_shaped_training(plan, device: str, dataset: str | None, image_size: int | None, channels: int | None,
                            data_root: str | None = None) -> dict:
    """Training speed of both presets' networks at another data shape (e.g. 32x32x3), as a fraction of the
    matmul rate measured in the same run, before and after. Pixels are seeded random ones of the shape
    (a step's speed does not depend on them); sampling is measured at 28x28 by the full bench only."""
    dev = resolve_device(device)
    configs = {}
    for name, preset_name in MODEL_PRESETS.items():
        base = PRESETS[preset_name]
        configs[name] = override(base, device=device, dataset=dataset if dataset != "folder" else None,
                                 image_size=image_size, channels=channels)
    shape = configs["unet"].data.shape
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(plan.batch_size * 4, 512), *shape), generator=gen, dtype=torch.uint8)
    rounds = [matmul_gflops(dev, plan.matmul_size, plan.matmul_repeats)]
    memory = PeakMemory(dev)
    train = {}
    for name, config in configs.items():
        train[name] = measure_training(config, dev, images, plan, max(rounds), memory)
        rounds.append(matmul_gflops(dev, plan.matmul_size, plan.matmul_repeats))
    best = max(rounds)
    for entry in train.values():
        entry["fraction_of_matmul"] = round(entry["achieved_gflops"] / best, 4)
    return {"shape": list(shape), "dataset": configs["unet"].data.dataset, "data": f"synthetic uint8 {tuple(shape)}",
            "matmul_gflops": round(best, 2), "matmul_rounds_gflops": [round(g, 2) for g in rounds], "train": train,
            "targets": {"improved_unet_fraction_of_matmul_ge_0.65": train["improved_unet"]["fraction_of_matmul"] >= 0.65}}


def wants(args: argparse.Namespace) -> bool:
    """Whether the flags ask for these figures instead of the full bench."""
    return args.data_load is not None or bool(args.dataset or args.image_size or args.channels)


def run(args: argparse.Namespace) -> int:
    plan = plan_of(args)
    result = {"bench_version": BENCH_VERSION, "mode": plan.mode, "load_average_at_start": _load_average(),
              "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if args.data_load is not None:
        result["data_load"] = measure_data_load(args.data_load)
    if args.dataset or args.image_size or args.channels:
        result["shaped_training"] = measure_shaped_training(plan, args.device, args.dataset, args.image_size,
                                                            args.channels, args.data_root)
    result["load_average_at_end"] = _load_average()  # other processes' load skews every figure
    return print_result(result, args.out)
