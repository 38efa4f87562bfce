"""`python -m core sample`: a grid (and optionally .npy images and per-step frames) from a run, with
any sampler, and for conditional runs the classes and guidance scale."""
from __future__ import annotations

import argparse
import io as bytes_io
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import ConfigError, RunConfig, SampleConfig
from ..device import resolve_device
from ..diffusion.guidance import (Conditioning, check_conditional, check_guidance, class_index, default_guidance,
                                  describe_labels, even_labels, per_class_labels)
from ..diffusion.sampling import collect, reverse_process, total_steps
from ..diffusion.schedule import NoiseScheduler
from ..errors import CliError, RunError
from ..models import budget
from ..store import export, io, runs
from .args import add_device, add_sampler_flags
from .argtypes import number, whole_number


def add_parser(sub) -> None:
    sa = sub.add_parser("sample", help="generate images from a run",
                        description="Generate images with DDPM (every step), or DDIM or DPM-Solver++(2M) (ODE "
                        "or SDE form) in any number of steps.")
    sa.add_argument("--run", required=True, help="run folder, e.g. checkpoints/demo-improved-unet-adamw")
    add_sampler_flags(sa)
    sa.add_argument("--n", type=whole_number, default=16, help="number of images")
    sa.add_argument("--seed", type=whole_number, default=0, help="random seed")
    sa.add_argument("--batch-size", type=whole_number, default=256, help="images per forward pass")
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    add_device(sa, "where to run")
    sa.add_argument("--out", help="PNG grid to write (default <run>/samples/sample_<sampler>.png)")
    sa.add_argument("--npy", help="write the final images as uint8 (N, C, H, W) .npy")
    sa.add_argument("--frames", help="write x_t and predicted x0 of every step as .npz")
    sa.add_argument("--class", dest="classes", nargs="+", metavar="K|NAME",
                    help="conditional runs: the class(es) to draw, e.g. 7 or Sneaker (default: all, in turn)")
    sa.add_argument("--guidance", type=number, metavar="GAMMA",
                    help="conditional runs: classifier-free guidance γ (0 unconditional, 1 conditional, "
                    "> 1 guided; default 3 as the book, 1 for a run trained without label dropout)")
    sa.add_argument("--per-class", type=whole_number, metavar="N",
                    help="conditional runs: a grid with one row of N images per class (replaces --n)")
    sa.add_argument("--quiet", action="store_true", help="no progress bar")
    sa.set_defaults(handler=run)


def conditioning(args: argparse.Namespace, config: RunConfig, run_name: str) -> Conditioning:
    """What --class, --guidance and --per-class ask of this run, checked before any sampling."""
    asked = [flag for flag, value in (("--class", args.classes), ("--guidance", args.guidance),
                                      ("--per-class", args.per_class)) if value is not None]
    if not config.model.conditional:
        if asked:
            check_conditional(config, run_name, what=asked[0])
        return Conditioning(None, 1.0, args.n, None)
    guidance = check_guidance(args.guidance if args.guidance is not None else default_guidance(config))
    classes = [class_index(c, config.data) for c in args.classes] if args.classes else None
    if args.per_class is not None:
        if args.per_class < 1:
            raise CliError(f"--per-class = {args.per_class} is not allowed: it must be at least 1")
        labels = per_class_labels(classes or range(config.model.num_classes), args.per_class)
        return Conditioning(labels, guidance, len(labels), args.per_class)
    labels = torch.tensor(classes)[even_labels(args.n, len(classes))] if classes else \
        even_labels(args.n, config.model.num_classes)
    return Conditioning(labels, guidance, args.n, None)


def _output_file(flag: str, value: str | None, suffix: str | None = None) -> Path | None:
    """The file an output flag will write (numpy adds .npy itself, so say so), checked before any
    work: not a folder, in a folder that exists and can be written."""
    if value is None:
        return None
    if not value.strip():
        raise CliError(f"{flag} = '' is not allowed: give a file path")
    path = Path(value)
    if suffix and path.suffix != suffix:
        path = path.with_name(path.name + suffix)
    if path.is_dir():
        raise CliError(f"{flag} = {value!r} is not allowed: it is a folder; give a file path inside it")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise CliError(f"{flag} = {value!r} is not allowed: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{flag} = {value!r} is not allowed: its folder {folder} is not writable")
    return path


def run(args: argparse.Namespace) -> int:
    sample_config = SampleConfig(sampler=args.sampler, steps=args.steps, eta=args.eta, n=args.n,
                                 seed=args.seed, batch_size=args.batch_size, spacing=args.spacing, clip=args.clip)
    # checked before sampling, which may take minutes, rather than failing when writing
    out = _output_file("--out", args.out)
    npy = _output_file("--npy", args.npy, suffix=".npy")
    frames = _output_file("--frames", args.frames)
    device = resolve_device(args.device)
    run_dir = Path(args.run)
    budget_config = runs.load_config(run_dir)
    try:
        budget.check_sampling_fits(budget_config.model, min(sample_config.batch_size, sample_config.n), device,
                                    image_size=budget_config.data.image_size)
    except ConfigError as exc:
        raise RunError(f"run {run_dir.name!r}: {exc}") from None
    loaded = runs.load_model(run_dir, use_ema=not args.no_ema, device=device)
    if loaded.fallback:
        print(f"note: run {loaded.name!r}: {loaded.fallback}", file=sys.stderr)
    cond = conditioning(args, loaded.config, loaded.name)
    sample_config = replace(sample_config, n=cond.n)
    scheduler = NoiseScheduler(loaded.config.schedule)
    steps = sample_config.resolved_steps(scheduler.num_timesteps)
    train_config = loaded.config.train
    process = reverse_process(loaded.model, scheduler, sample_config, pixel_range=train_config.pixel_range,
                              clip_default=train_config.clip_denoised, device=device, labels=cond.labels,
                              guidance=cond.guidance, prediction=train_config.prediction,
                              shape=loaded.config.data.shape)
    if not args.quiet:
        process = tqdm(process, total=total_steps(sample_config, scheduler), unit="step",
                       desc=f"{args.sampler} {steps} steps", dynamic_ncols=True)
    result = collect(process, pixel_range=train_config.pixel_range, record="all" if frames else "none")
    out = out or loaded.path / "samples" / f"sample_{args.sampler}.png"
    export.save_grid(out, result.images, ncol=cond.ncol)
    written = [str(out)]
    if npy:
        buffer = bytes_io.BytesIO()
        np.save(buffer, result.images)
        io.atomic_write_bytes(npy, buffer.getvalue())
        written.append(str(npy))
    if frames:
        io.atomic_write_bytes(frames, export.frames_npz(result.images, result.frame_timesteps,
                                                        result.frames_xt, result.frames_x0))
        written.append(str(frames))
    guidance = "" if cond.labels is None else f", {describe_labels(cond.labels, loaded.config.data)}, " \
        f"guidance {cond.guidance:g}"
    print(f"{len(result.images)} samples ({args.sampler}, {steps} steps, "
          f"{'EMA' if loaded.used_ema else 'raw'} weights{guidance}) -> {', '.join(written)}")
    return 0

