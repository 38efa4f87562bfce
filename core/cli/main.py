"""`python -m core train | sample | eval | bench | runs | queue`: the same engine the dashboard uses.

Every user mistake (a bad flag value, a damaged run, a missing dataset) ends with one line on
stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import io as bytes_io
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .. import bench
from ..models import budget
from ..train import distributed
from ..store import export, io, report, runs
from . import sweep as sweep_cli
from ..work import sweeps
from ..work import queue as run_queue
from .argtypes import number, whole_number
from ..bench.flops import model_costs
from .console import EXIT_SIGNAL, ProgressBar, StopOnSignals
from ..config import (CLIP_NAMES, DEVICE_NAMES, LABEL_DROPOUT_MODES, MODEL_NAMES, OPTIMIZER_NAMES,
                     PIXEL_RANGES, PREDICTION_NAMES, PRESETS, SAMPLER_NAMES, SCHEDULE_NAMES, SPACING_NAMES,
                     ConfigError, RunConfig, SampleConfig, check_run_name, objective_label, override, preset)
from ..data.datasets import DatasetNotFoundError
from ..data.sources import load_run_images
from . import data as data_cli
from ..device import resolve_device
from ..train.distributed import BACKEND_NAMES, DEFAULT_TIMEOUT_S, TIMEOUT_ENV, check_backend, launched_world, timeout_seconds
from ..errors import CliError, RunError
from . import evaluate as evaluation_cli
from ..diffusion.guidance import (Conditioning, check_conditional, check_guidance, class_index, default_guidance,
                       describe_labels, even_labels, per_class_labels)
from ..diffusion.sampling import collect, reverse_process, total_steps
from ..diffusion.schedule import NoiseScheduler
from ..train.training import DiskFull, TrainingDiverged, check_data_fits, train_run

EXIT_USAGE = 2
EXIT_FAILED = 1
# What a resumed run cannot change: it would no longer match its weights, optimizer state or curve.
RESUME_FIXED_FLAGS = ("model", "base_channels", "channel_mults", "num_res_blocks", "attention", "norm",
                      "optimizer", "dataset", "data_dir", "image_size", "channels", "hflip", "batch_size", "lr", "weight_decay", "warmup_steps", "timesteps",
                      "schedule", "pixel_range", "ema_decay", "grad_clip", "limit_images", "seed", "compile",
                      "channels_last", "conditional", "label_dropout", "label_dropout_mode", "prediction",
                      "min_snr_gamma")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(EXIT_USAGE, f"error: {message} (see `python -m core {self.prog.split()[-1]} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m core", description="Train, sample and evaluate the book's DDPM and "
                     "the ImprovedUNet on FashionMNIST / MNIST.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tr = sub.add_parser("train", help="train a run (new or --resume)",
                        description="Train a diffusion model into checkpoints/<name>/. A preset fills every "
                        "setting; explicit flags override it.")
    tr.add_argument("--preset", choices=sorted(PRESETS), default="book",
                    help="book: step 9 exactly (UNet, Adam 1e-3, batch 128, 10 epochs, T=1000); improved: "
                    "ImprovedUNet + AdamW, EMA; quick: a small ImprovedUNet for ~5 minutes on a CPU; "
                    "tiny: the whole pipeline in about a minute (T=20, 48 steps); book-cond / book-cfg: step 10 "
                    "(conditional UNet; with per-batch label dropout 0.1 for guidance); improved-cfg: the "
                    "ImprovedUNet with labels and classifier-free guidance")
    tr.add_argument("--model", choices=MODEL_NAMES, help="network: the book's unet or improved_unet")
    tr.add_argument("--base-channels", type=whole_number, help="width of the first level (book: 64)")
    tr.add_argument("--channel-mults", type=whole_number, nargs="+",
                    help="improved_unet: width multiplier per resolution, e.g. 1 2 2")
    tr.add_argument("--num-res-blocks", type=whole_number, help="improved_unet: residual blocks per level")
    tr.add_argument("--attention", choices=("on", "off"), help="improved_unet: self-attention at 7x7")
    tr.add_argument("--norm", choices=("group", "batch"), help="improved_unet: GroupNorm or BatchNorm")
    tr.add_argument("--optimizer", choices=OPTIMIZER_NAMES, help="adam (the book) or adamw (decoupled decay)")
    data_cli.add_train_arguments(tr)
    tr.add_argument("--epochs", type=whole_number, help="passes over the data (0: no epoch limit)")
    tr.add_argument("--max-steps", type=whole_number, help="stop after this many steps (0: no limit)")
    tr.add_argument("--time-budget", type=number, metavar="SECONDS", help="stop after this much training time")
    tr.add_argument("--batch-size", type=whole_number, help="images per step (book: 128)")
    tr.add_argument("--lr", type=number, help="learning rate (book: 1e-3)")
    tr.add_argument("--weight-decay", type=number, help="weight decay (L2 for adam, decoupled for adamw)")
    tr.add_argument("--warmup-steps", type=whole_number, help="linear learning-rate warm-up")
    tr.add_argument("--timesteps", type=whole_number, help="diffusion steps T (book: 1000)")
    tr.add_argument("--schedule", choices=SCHEDULE_NAMES, help="beta schedule (book: linear)")
    tr.add_argument("--pixel-range", choices=PIXEL_RANGES, help="unit = [0, 1] (book), symmetric = [-1, 1]")
    tr.add_argument("--ema-decay", type=number, help="EMA of the weights, e.g. 0.999 (0: off)")
    tr.add_argument("--grad-clip", type=number, help="clip the gradient norm (0: off)")
    tr.add_argument("--limit-images", type=whole_number, help="train on the first N images only")
    tr.add_argument("--checkpoint-every", type=number, metavar="SECONDS", help="periodic checkpoint interval")
    tr.add_argument("--seed", type=whole_number, help="random seed")
    tr.add_argument("--device", choices=DEVICE_NAMES, help="auto picks CUDA, then MPS, then CPU")
    tr.add_argument("--compile", choices=("on", "off"), help="torch.compile the model (measure first)")
    tr.add_argument("--channels-last", choices=("on", "off"), help="channels_last memory format")
    tr.add_argument("--conditional", action="store_const", const=True, default=None,
                    help="class-conditional network (step 10): a label embedding for the 10 classes")
    tr.add_argument("--label-dropout", type=number, metavar="P",
                    help="conditional: share of labels dropped for classifier-free guidance (default 0.1; "
                    "0 = conditional only)")
    tr.add_argument("--label-dropout-mode", choices=LABEL_DROPOUT_MODES,
                    help="conditional: drop labels per sample (default) or the whole batch at once (the book)")
    tr.add_argument("--prediction", choices=PREDICTION_NAMES,
                    help="what the network learns to predict: eps, the noise (the book), or v = "
                    "sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0 (Salimans & Ho 2022); every sampler handles both")
    tr.add_argument("--min-snr-gamma", type=number, metavar="GAMMA",
                    help="Min-SNR-γ loss weighting (Hang et al. 2023; the paper uses 5): each sample's MSE "
                    "weighted by min(SNR, γ) over its target's SNR factor (0 = off, the book's plain MSE)")
    tr.add_argument("--runs-dir", default=None, help="folder of run folders (default checkpoints)")
    tr.add_argument("--name", help="run name (A-Z a-z 0-9 . _ -); default: preset-model-optimizer-time")
    tr.add_argument("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    tr.add_argument("--queue", action="store_true",
                    help="create the run folder and add it to the run queue instead of training now "
                    "(`python -m core queue run`, or the dashboard, trains it)")
    tr.add_argument("--data-root", help="folder holding FashionMNIST/raw or MNIST/raw (env DDPM_DATA_ROOT)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--dist-backend", choices=BACKEND_NAMES, default="auto",
                    help="under torchrun: auto (nccl for CUDA, gloo for CPU), nccl or gloo")
    tr.add_argument("--dist-timeout", type=number, metavar="SECONDS", default=None,
                    help=f"under torchrun: how long a rank waits for the others before the job fails "
                    f"(default ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT_S:g})")

    sa = sub.add_parser("sample", help="generate images from a run",
                        description="Generate images with DDPM (every step), or DDIM or DPM-Solver++(2M) (ODE "
                        "or SDE form) in any number of steps.")
    sa.add_argument("--run", required=True, help="run folder, e.g. checkpoints/demo-improved-unet-adamw")
    sa.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm",
                    help="ddpm (the book), ddim, dpmpp2m (DPM-Solver++(2M)) or dpmpp2m-sde")
    sa.add_argument("--steps", type=whole_number, default=0, help="reverse steps (not ddpm; default T)")
    sa.add_argument("--eta", type=number, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    sa.add_argument("--spacing", choices=SPACING_NAMES, default="uniform",
                    help="timesteps of the few-step samplers: even in t, or even in log-SNR")
    sa.add_argument("--clip", choices=CLIP_NAMES, default="auto",
                    help="clip x̂0 to the data range (auto: the run's default for ddpm, on for the others)")
    sa.add_argument("--n", type=whole_number, default=16, help="number of images")
    sa.add_argument("--seed", type=whole_number, default=0, help="random seed")
    sa.add_argument("--batch-size", type=whole_number, default=256, help="images per forward pass")
    sa.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    sa.add_argument("--device", choices=DEVICE_NAMES, default="auto", help="where to run")
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

    ev = sub.add_parser("eval", help="measure sample quality (Fréchet distance in a classifier's features)")
    evaluation_cli.add_arguments(ev)

    sw = sub.add_parser("sweep", help="a grid or ablation path of runs on one budget, trained and scored in one go",
                        description="Make a sweep (every combination of the --vary factors, or one change at a "
                        "time along a path), train its runs one after another on the same budget, score each, "
                        "and write results.csv / results.json in <runs>/sweeps/<name>/.")
    sweep_cli.add_arguments(sw)

    be = sub.add_parser("bench", help="measure training and sampling speed on this device")
    bench.add_arguments(be)

    rp = sub.add_parser("report", help="results page of runs: loss curves PNG, grids side by side, eval table")
    rp_what = rp.add_mutually_exclusive_group(required=True)
    rp_what.add_argument("--runs", nargs="+", help="run folders to compare")
    rp_what.add_argument("--sweep", metavar="NAME", help="a sweep instead: <NAME>_fd.png, <NAME>_loss.png and "
                         "<NAME>_table.md from its results (see `sweep`)")
    rp.add_argument("--runs-dir", default=None, help="with --sweep: folder of run folders (default checkpoints)")
    rp.add_argument("--out", default="docs", help="folder for loss_curves.png, sample_grids.png, results_table.md "
                    "and, once runs have step sweeps, steps_quality.png and sweep_table.md")
    rp.add_argument("--grid", default="final.png", help="which samples/*.png of each run to show")

    data_cli.add_command(sub)

    add_queue_parser(sub)

    ru = sub.add_parser("runs", help="list runs (or --models: parameters and FLOPs of each network)")
    ru.add_argument("--runs-dir", default=None, help="folder of run folders (default checkpoints)")
    ru.add_argument("--models", action="store_true", help="print parameters and FLOPs per image of each model")
    ru.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


# -- commands ----------------------------------------------------------------------------------------
def runs_dir_of(args: argparse.Namespace) -> Path:
    """--runs-dir, checked: an empty value or a path to a file is a mistake, not the default."""
    if args.runs_dir is None:
        return runs.DEFAULT_RUNS_DIR
    if not args.runs_dir.strip():
        raise CliError("--runs-dir = '' is not allowed: give a folder, or leave the flag out for checkpoints/")
    path = Path(args.runs_dir)
    if path.exists() and not path.is_dir():
        raise CliError(f"--runs-dir = {args.runs_dir!r} is not allowed: it is a file, not a folder")
    return path


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run, as one process or as every rank of a torchrun job (`torchrun --nproc-per-node N
    -m core train ...`): then --batch-size is per process, rank 0 alone decides, writes and prints,
    and the other ranks follow its decisions, so a refused run is refused on every rank."""
    flags = lambda v: None if v is None else v == "on"  # noqa: E731
    config = override(
        preset(args.preset), model=args.model, base_channels=args.base_channels,
        channel_mults=tuple(args.channel_mults) if args.channel_mults else None,
        num_res_blocks=args.num_res_blocks, attention=flags(args.attention), norm=args.norm,
        optimizer=args.optimizer, epochs=args.epochs, max_steps=args.max_steps,
        time_budget_s=args.time_budget, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, timesteps=args.timesteps, schedule=args.schedule,
        pixel_range=args.pixel_range, ema_decay=args.ema_decay, grad_clip=args.grad_clip,
        limit_images=args.limit_images, checkpoint_every_s=args.checkpoint_every, seed=args.seed,
        device=args.device, compile=flags(args.compile), channels_last=flags(args.channels_last),
        label_dropout=args.label_dropout, label_dropout_mode=args.label_dropout_mode, prediction=args.prediction,
        min_snr_gamma=args.min_snr_gamma)
    config = data_cli.apply_train_arguments(config, args)
    if not config.model.conditional and (args.label_dropout is not None or args.label_dropout_mode is not None):
        raise CliError("--label-dropout and --label-dropout-mode need a conditional run: add --conditional "
                       "(or use --preset improved-cfg, book-cfg)")
    world = launched_world()
    if args.queue:
        return _queue_new_run(args, config, world)
    # Refused before any process group exists: every rank sees the same flags and says the same.
    check_backend(args.dist_backend, args.device or ("auto" if args.resume else config.train.device))
    timeout_s = timeout_seconds(args.dist_timeout)
    if not world.distributed:
        return _train_command(args, config, world)
    distributed.init_process_group(world, args.dist_backend, timeout_s)
    try:
        return _train_command(args, config, world)
    except Exception as exc:
        if distributed.is_peer_failure(exc):  # named while the group is open: after it, it is a plain error
            raise distributed.PeerFailure(distributed.peer_failure_message(exc)) from None
        raise
    finally:
        distributed.shutdown()


def default_run_name(args: argparse.Namespace, config: RunConfig) -> str:
    return args.name or f"{args.preset}-{config.model.name}-{config.train.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"


def _queue_new_run(args: argparse.Namespace, config: RunConfig, world: distributed.World) -> int:
    """`train --queue`: the run folder, with its config, added to the queue; nothing trains now."""
    if args.resume:
        raise CliError("--queue and --resume do not go together: queue an existing run with "
                       "`python -m core queue add NAME` (the queue resumes it from its checkpoint)")
    if world.distributed:
        raise CliError("--queue is not for torchrun: queue the run from one process")
    runs_dir = runs_dir_of(args)
    if args.name is not None:
        check_run_name(args.name)
    name = default_run_name(args, config)
    run_dir = runs.run_path(runs_dir, name)
    if run_dir.exists():
        raise ConfigError(f"name = {name!r} is not allowed: a run of that name exists in {run_dir.parent}; "
                          f"pick another name, or queue it with `python -m core queue add {name}`")
    budget.check_training_fits(config, resolve_device(config.train.device))
    run_queue.read_queue(runs_dir)  # a damaged queue file: refused before the folder exists
    runs.create_run(runs_dir, name, config)
    try:
        entry = run_queue.add(runs_dir, [name])[0]
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # created a moment ago, never trained
        raise
    line = run_queue.read_queue(runs_dir).position(entry.id)
    print(f"queued: {run_dir} (entry {entry.id}, place {line} in the queue); "
          "`python -m core queue run` trains the queue")
    return 0


def _train_command(args: argparse.Namespace, config: RunConfig, world: distributed.World) -> int:
    runs_dir = runs_dir_of(args)
    if args.name is not None:
        check_run_name(args.name)  # "" is a mistake, not "pick a name for me"
    lock: runs.RunLock | None = None  # rank 0 holds the run's lock for the whole job

    def plan() -> tuple[str, str, bool]:
        """Rank 0: which folder, with which config, and whether config.json must be (re)written."""
        if not args.resume:
            name = default_run_name(args, config)
            run_dir = runs.run_path(runs_dir, name)
            if run_dir.exists():
                raise ConfigError(f"name = {name!r} is not allowed: a run of that name exists in {run_dir.parent}; "
                                  "pick another name, or resume it with --resume")
            # before the folder exists: a run that cannot fit in memory leaves nothing
            budget.check_training_fits(config, resolve_device(config.train.device))
            return str(run_dir), config.to_json(), True
        if not args.name:
            raise CliError("--resume needs --name of the run to continue")
        run_dir = runs.run_path(runs_dir, args.name)
        # The run's own config wins, except how long to train and where: a resumed run may be
        # given more epochs, steps or time, or be moved to another device or world size.
        fixed = [f"--{k.replace('_', '-')}" for k in RESUME_FIXED_FLAGS if getattr(args, k) is not None]
        if fixed:  # silently ignoring them would train something other than what was asked for
            raise CliError(f"{', '.join(fixed)} cannot change on --resume: the run's config.json fixes them; "
                           "--resume accepts --epochs, --max-steps, --time-budget, --device, --checkpoint-every")
        saved = runs.load_config(run_dir)
        resumed = override(data_cli.check_resumed_data(saved, args.allow_data_change), epochs=args.epochs, max_steps=args.max_steps,
                           time_budget_s=args.time_budget, device=args.device,
                           checkpoint_every_s=args.checkpoint_every)
        # Checks that touch nothing come first: a rejected resume leaves the run exactly as it was.
        budget.check_training_fits(resumed, resolve_device(resumed.train.device))
        runs.refuse_if_locked(run_dir)  # said at once; prepare() takes the lock itself, which also settles races
        return str(run_dir), resumed.to_json(), resumed != saved

    run_dir, config_json, write_config = distributed.agree(plan, world)
    run_dir, config = Path(run_dir), RunConfig.from_json(config_json)
    # Before touching the folder: a missing device, a backend that cannot carry it, a missing
    # dataset or one too small for a batch on every rank leaves nothing behind, on every rank.
    device = distributed.device_for(world, resolve_device(config.train.device))
    check_backend(args.dist_backend, device)
    images = load_run_images(config.data, "train", args.data_root)
    n_images = min(len(images), config.train.limit_images) if config.train.limit_images else len(images)
    check_data_fits(n_images, config.train.batch_size, world.size)

    def prepare() -> None:
        """Rank 0: the folder and its lock. The lock comes before the run is changed in any way: two
        resumes started together must not both train, nor both rewrite config.json."""
        nonlocal lock
        if not args.resume:
            runs.create_run(runs_dir, run_dir.name, config)
        lock = runs.RunLock(run_dir).acquire()
        try:
            if args.resume and write_config:
                io.atomic_write_text(run_dir / "config.json", config.to_json())
        except BaseException:
            lock.release()
            raise

    distributed.agree(prepare, world)  # also the barrier: no rank trains before the folder exists
    bar = None if args.quiet or not world.is_main else ProgressBar()
    with StopOnSignals() as stop:
        progress = train_run(run_dir, resume=args.resume, images=images, on_progress=bar.update if bar else None,
                             stop_event=stop.event, lock=lock)
    if bar:
        bar.close()
    if world.is_main:
        last = f"{progress.losses[-1]:.4f}" if progress.losses else "n/a"
        print(f"{progress.state}: {run_dir} step {progress.step}, last loss {last}, "
              f"{progress.elapsed_s:.0f} s on {progress.device}")
    return EXIT_SIGNAL[stop.signal] if stop.signal is not None else 0


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


def cmd_sample(args: argparse.Namespace) -> int:
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


def cmd_runs(args: argparse.Namespace) -> int:
    if args.models:
        return _print_models(args.json)
    infos = runs.list_runs(runs_dir_of(args))
    rows = []
    for info in infos:
        cfg = info.config
        rows.append({
            "name": info.name, "state": info.state,
            "model": cfg.model.name if cfg else "?", "optimizer": cfg.train.optimizer if cfg else "?",
            "dataset": cfg.data.dataset if cfg else "?", "step": info.step,
            "objective": objective_label(cfg.train) if cfg else "?",  # '' for the book's ε + MSE
            "last_loss": info.last_loss, "error": info.error,
        })
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no runs yet: train one with `python -m core train --preset quick`")
        return 0
    print(f"{'name':40} {'state':11} {'model':14} {'optimizer':9} {'dataset':13} {'step':>7} {'loss':>8}")
    for r in rows:
        loss = f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "-"
        objective = f"  ({r['objective']})" if r["objective"] else ""  # only where not the book's
        print(f"{r['name'][:40]:40} {r['state']:11} {r['model']:14} {r['optimizer']:9} {r['dataset']:13} "
              f"{r['step']:>7} {loss:>8}{objective}")
        if r["error"] and r["state"] in ("damaged", "failed"):
            print(f"    {r['error']}")
    return 0


def _print_models(as_json: bool) -> int:
    rows = model_costs()
    if as_json:
        print(json.dumps(rows))
        return 0
    print(f"{'preset':10} {'model':14} {'params':>10} {'fwd GFLOP/img':>14} {'train GFLOP/img':>16} {'vs book':>8}")
    for r in rows:
        print(f"{r['preset']:10} {r['model']:14} {r['params']:>10,} {r['forward_gflop']:>14.3f} "
              f"{r['train_gflop']:>16.3f} {r['train_vs_book']:>7.2f}x")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.sweep:
        return _report_sweep(args)
    infos = []
    for path in args.runs:
        info = runs.run_info(Path(path))
        if not info.readable or info.state == "damaged":
            raise CliError(info.error or f"run {path} cannot be read")
        infos.append(info)
    out = Path(args.out)
    written = [report.loss_curves_png(infos, out / "loss_curves.png")]
    grids = [(report.run_label(i), i.path / "samples" / args.grid) for i in infos]
    missing = [str(p) for _, p in grids if not p.is_file()]
    if missing:
        raise CliError(f"no sample grid {', '.join(missing)}; sample the runs first or pick --grid")
    written.append(report.grids_side_by_side_png(grids, out / "sample_grids.png"))
    (out / "results_table.md").write_text(report.eval_table(infos) + "\n", encoding="utf-8")
    written.append(out / "results_table.md")
    curve = report.steps_quality_png(infos, out / "steps_quality.png")
    if curve is not None:  # only once some run has few-step evaluations
        (out / "sweep_table.md").write_text(report.sweep_table(infos) + "\n", encoding="utf-8")
        written += [curve, out / "sweep_table.md"]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _report_sweep(args: argparse.Namespace) -> int:
    runs_dir, out, name = runs_dir_of(args), Path(args.out), args.sweep
    rows = sweeps.write_results(runs_dir, name)
    table = out / f"{name}_table.md"
    out.mkdir(parents=True, exist_ok=True)
    table.write_text(report.sweep_results_table(rows) + "\n", encoding="utf-8")
    written = [table]
    chart = report.sweep_fd_png(rows, out / f"{name}_fd.png", title=name)
    if chart is not None:
        written.append(chart)
    infos = [runs.run_info(runs.run_path(runs_dir, r["run"])) for r in rows if r["state"] != "missing"]
    readable = [i for i in infos if i.readable]
    if readable:
        labels = {r["run"]: f"{i}. {r['label']}" for i, r in enumerate(rows, 1)}
        written.append(report.loss_curves_png(readable, out / f"{name}_loss.png", x_axis="step", labels=labels,
                                              title=f"Training loss of the sweep {name}"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


cmd_data = data_cli.cmd_data


# -- the run queue ------------------------------------------------------------------------------------
def add_queue_parser(sub) -> None:
    qu = sub.add_parser("queue", help="queue runs to train one after another (shared with the dashboard)",
                        description="The run queue: queue.json in the runs folder, shared with the dashboard's "
                        "Train page. One run trains at a time; a failed run does not stop the queue.")
    qs = qu.add_subparsers(dest="queue_command", required=True, parser_class=_Parser)

    def with_runs_dir(parser):
        parser.add_argument("--runs-dir", default=None, help="folder of run folders (default checkpoints)")
        return parser

    add = with_runs_dir(qs.add_parser("add", help="queue existing runs (in this order)"))
    add.add_argument("runs", nargs="+", metavar="RUN", help="run names (folders in the runs folder)")
    ls = with_runs_dir(qs.add_parser("list", help="the queue: position, id, run, state, error"))
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rm = with_runs_dir(qs.add_parser("remove", help="take an entry off the queue (not the running one)"))
    rm.add_argument("id", help="entry id, from `queue list`")
    mv = with_runs_dir(qs.add_parser("move", help="move a queued entry to another place in line"))
    mv.add_argument("id", help="entry id, from `queue list`")
    mv.add_argument("--to", type=whole_number, required=True, metavar="N", help="1-based place in the waiting line")
    with_runs_dir(qs.add_parser("resume", help="put stopped and interrupted entries back in line and unpause"))
    with_runs_dir(qs.add_parser("pause", help="start no further run (the current one trains on)"))
    with_runs_dir(qs.add_parser("clear", help="drop finished and failed entries (the runs stay)"))
    ev = with_runs_dir(qs.add_parser("eval", help="evaluate every run the queue finishes (or --off)"))
    ev.add_argument("--sampler", choices=SAMPLER_NAMES, help="sampler to score with")
    ev.add_argument("--steps", type=whole_number, help="reverse steps (0 = T; ddpm always runs T)")
    ev.add_argument("--n", type=whole_number, help="number of images scored (compare only at the same N)")
    ev.add_argument("--off", action="store_true", help="no evaluation")
    rn = with_runs_dir(qs.add_parser("run", help="work the queue here until nothing is queued or it pauses "
                                     "(Ctrl-C stops the current run, which stays `stopped`)"))
    rn.add_argument("--data-root", help="folder holding FashionMNIST/raw or MNIST/raw (env DDPM_DATA_ROOT)")
    rn.add_argument("--device", choices=DEVICE_NAMES, default="auto", help="where to evaluate")


def _format_time(value: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(value)) if value else "-"


def _print_queue(current: run_queue.Queue) -> None:
    state = "paused" if current.paused else "active"
    evaluation = current.eval.label if current.eval else "off"
    print(f"queue {state}; evaluation after each run: {evaluation}")
    if not current.entries:
        print("nothing queued: `python -m core queue add RUN`, or `python -m core train ... --queue`")
        return
    print(f"{'pos':>3} {'id':8} {'run':40} {'state':11} {'started':8} {'ended':8} error")
    for entry in current.entries:
        position = current.position(entry.id)
        print(f"{position or '-':>3} {entry.id:8} {entry.run[:40]:40} {entry.state:11} "
              f"{_format_time(entry.started_at):8} {_format_time(entry.ended_at):8} {entry.error or ''}")


def cmd_queue(args: argparse.Namespace) -> int:
    runs_dir = runs_dir_of(args)
    command = args.queue_command
    if command == "add":
        added = run_queue.add(runs_dir, args.runs)
        print("queued " + ", ".join(f"{e.run} (entry {e.id})" for e in added))
    elif command == "list":
        current = run_queue.read_queue(runs_dir)
        if args.json:
            print(json.dumps({"paused": current.paused, "eval": current.eval.to_dict() if current.eval else None,
                              "entries": [{**e.to_dict(), "position": current.position(e.id)}
                                          for e in current.entries]}))
        else:
            _print_queue(current)
    elif command == "remove":
        entry = run_queue.remove(runs_dir, args.id)
        print(f"removed entry {entry.id} ({entry.run}); the run folder stays")
    elif command == "move":
        run_queue.move(runs_dir, args.id, args.to)
        print(f"moved entry {args.id} to place {args.to}")
    elif command == "resume":
        current = run_queue.resume(runs_dir)
        print(f"queue resumed: {len(current.queued)} run(s) waiting")
    elif command == "pause":
        run_queue.pause(runs_dir)
        print("queue paused: the current run trains on, no other starts until `queue resume`")
    elif command == "clear":
        before = len(run_queue.read_queue(runs_dir).entries)
        after = len(run_queue.clear_finished(runs_dir).entries)
        print(f"cleared {before - after} finished or failed entries")
    elif command == "eval":
        given = [f for f, v in (("--sampler", args.sampler), ("--steps", args.steps), ("--n", args.n)) if v is not None]
        if args.off:
            if given:
                raise CliError(f"--off and {', '.join(given)} do not go together")
            run_queue.set_eval(runs_dir, None)
            print("evaluation after each run: off")
        else:
            if len(given) < 3:
                raise CliError("queue eval needs --sampler, --steps and --n (or --off)")
            setting = run_queue.check_eval_setting(args.sampler, args.steps, args.n)
            run_queue.set_eval(runs_dir, setting)
            print(f"evaluation after each run: {setting.label}")
    elif command == "run":
        return _work_queue(runs_dir, args)
    return 0


def _work_queue(runs_dir: Path, args: argparse.Namespace) -> int:
    from ..work.jobs import QueueRunner  # jobs imports the evaluation stack: only this command needs it

    current = run_queue.read_queue(runs_dir)  # a damaged file is refused before anything starts
    if current.paused:
        raise CliError("the queue is paused: `python -m core queue resume` first" +
                       (f" ({len(current.interrupted)} stopped or interrupted)" if current.interrupted else ""))
    if not current.queued:
        print("nothing queued")
        return 0
    stamp = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    runner = QueueRunner(runs_dir, data_root=args.data_root, exit_when_idle=True, eval_device=args.device,
                         on_event=stamp)
    runner.start()
    stopping = False
    with StopOnSignals() as stop:
        while runner.alive:
            runner.join(0.2)
            if stop.event.is_set() and not stopping:
                stopping = True
                runner.stop()  # the current run checkpoints and ends `stopped`; the queue pauses
        runner.join()
    if runner.traceback:
        error = runner.snapshot().error or "the queue worker failed"
        raise RunError(error)
    final = run_queue.read_queue(runs_dir)
    counts = {s: sum(e.state == s for e in final.entries) for s in run_queue.STATES}
    print("queue " + ("paused" if final.paused else "done") + ": " +
          ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return EXIT_SIGNAL[stop.signal] if stop.signal is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": cmd_train, "sample": cmd_sample, "runs": cmd_runs, "data": cmd_data,
                "report": cmd_report, "eval": evaluation_cli.run, "bench": bench.run, "queue": cmd_queue,
                "sweep": lambda a: sweep_cli.run(a, runs_dir_of(a))}
    # Under torchrun every rank runs this; rank 0 alone prints a user error, all exit alike.
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        return handlers[args.command](args)
    except (ConfigError, RunError, DatasetNotFoundError, CliError) as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingDiverged, DiskFull) as exc:  # the run is already marked failed in its folder
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except distributed.PeerFailure as exc:  # every rank says why it ends; the run is marked interrupted
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
