"""`python -m core train`: a new run, a resumed one (--resume), a queued one (--queue), or every
rank of a torchrun job."""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from ..config import (LABEL_DROPOUT_MODES, MODEL_NAMES, OPTIMIZER_NAMES, PIXEL_RANGES,
                      PREDICTION_NAMES, PRESETS, SCHEDULE_NAMES, ConfigError, RunConfig, check_run_name, override,
                      preset)
from ..train.data import load_training_images
from ..device import resolve_device
from ..errors import CliError
from ..models import budget
from ..store import io, runs
from ..train import distributed
from ..train.distributed import (BACKEND_NAMES, DEFAULT_TIMEOUT_S, TIMEOUT_ENV, check_backend, launched_world,
                                 timeout_seconds)
from ..train.training import check_data_fits, train_run
from ..work import queue as run_queue
from .args import add_data_root, add_device, add_runs_dir, runs_dir_of
from .argtypes import number, whole_number
from . import data as data_cli
from .console import EXIT_SIGNAL, ProgressBar, StopOnSignals

# What a resumed run cannot change: it would no longer match its weights, optimizer state or curve.
RESUME_FIXED_FLAGS = ("model", "base_channels", "channel_mults", "num_res_blocks", "attention", "norm",
                      "optimizer", "dataset", "data_dir", "image_size", "channels", "hflip", "batch_size", "lr", "weight_decay", "warmup_steps", "timesteps",
                      "schedule", "pixel_range", "ema_decay", "grad_clip", "limit_images", "seed", "compile",
                      "channels_last", "conditional", "label_dropout", "label_dropout_mode", "prediction",
                      "min_snr_gamma")


def add_parser(sub) -> None:
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
    add_device(tr, "auto picks CUDA, then MPS, then CPU", default=None)
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
    add_runs_dir(tr)
    tr.add_argument("--name", help="run name (A-Z a-z 0-9 . _ -); default: preset-model-optimizer-time")
    tr.add_argument("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    tr.add_argument("--queue", action="store_true",
                    help="create the run folder and add it to the run queue instead of training now "
                    "(`python -m core queue run`, or the dashboard, trains it)")
    add_data_root(tr)
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--dist-backend", choices=BACKEND_NAMES, default="auto",
                    help="under torchrun: auto (nccl for CUDA, gloo for CPU), nccl or gloo")
    tr.add_argument("--dist-timeout", type=number, metavar="SECONDS", default=None,
                    help=f"under torchrun: how long a rank waits for the others before the job fails "
                    f"(default ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT_S:g})")
    tr.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
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
            if os.path.lexists(run_dir):
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
    images = load_training_images(config.data, args.data_root, world)  # rank 0 prepares, then all read
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

