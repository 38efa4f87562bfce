"""The trainer (model, optimizer, EMA, one step) and the training loop (`train_run`).

Network, diffusion process and trainer are separate: the loop only draws batches, noises them
with the scheduler and regresses the model's ε̂ on ε (the book's MSE). It writes everything to
the run folder, so the CLI and the dashboard share one engine, and a run killed at any moment
loses at most the work since its last checkpoint.
"""
from __future__ import annotations

import copy
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import budget, checkpoint, runs
from .config import ConfigError, RunConfig, SampleConfig
from .data import ImageSet, load_images, to_model_range
from .device import autocast_for, resolve_device
from .errors import RunError
from .export import save_grid
from .io import is_disk_full, load_optimizer_bytes, load_weights_bytes, optimizer_bytes, weights_bytes
from .models import build_model
from .sampling import sample
from .schedule import NoiseScheduler

GRID_SAMPLES = 16
GRID_SEED = 1234
FIRST_CHECKPOINT_S = 30.0  # a run's first checkpoint comes after this long or its first epoch, if sooner


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class DiskFull(RuntimeError):
    """The disk (or quota) filled up while the run was writing; the last complete checkpoint stands."""


class StopRequested(Exception):
    """Raised inside the loop when stop() was called; the loop saves and ends cleanly."""


# -- EMA ---------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's weights: θ_ema ← d·θ_ema + (1 − d)·θ.

    Buffers (BatchNorm running stats) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm up the decay so early EMA weights are not dominated by the random init.
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)


# -- progress ----------------------------------------------------------------------------------------
@dataclass
class Progress:
    """What a job reports; copied out under a lock, so readers never see a half-updated one."""
    state: str = "starting"            # starting, running, stopping, finished, stopped, failed
    run_name: str = ""
    run_dir: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    images_per_s: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    error: str | None = None
    latest_grid: str | None = None
    device: str = ""
    message: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "stopping")


ProgressFn = Callable[[Progress], None]


# -- the loop ----------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    train = config.train
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    # Adam's weight_decay is an L2 term inside the gradient; AdamW's is decoupled (Loshchilov &
    # Hutter 2019). The same number means different things, which is the blog's point.
    return kind(model.parameters(), lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)


class Trainer:
    """Everything one optimisation step needs, built once from a run's config: the model (in its
    memory format, optionally compiled), the optimizer, the EMA, the learning-rate schedule, the
    float32 ᾱ table on the device and the autocast context.

    The training loop and `python -m core bench` both build this and call `train_step`, so the
    benchmark times exactly what trains.
    """

    def __init__(self, config: RunConfig, device: torch.device):
        train = config.train
        torch.manual_seed(train.seed)  # the same initial weights for the same seed, loop or bench
        self.config, self.device = config, device
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        self.model = build_model(config.model).to(device).to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, config)
        self.ema = EMA(self.model, train.ema_decay) if train.ema_decay > 0 else None
        self.forward = torch.compile(self.model) if train.compile else self.model
        self.scheduler = NoiseScheduler(config.schedule)
        # float32 on the device, gathered per step; the scheduler keeps float64 for sampling
        self.alpha_bars = self.scheduler.alpha_bars.to(device=device, dtype=torch.float32)
        self.autocast = autocast_for(device)
        self.step = 0  # optimisation steps taken so far
        self.model.train()

    @property
    def sampling_model(self) -> nn.Module:
        """The weights to sample from: the EMA where there is one."""
        return self.ema.model if self.ema is not None else self.model

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then the constant learning rate."""
        warmup, lr = self.config.train.warmup_steps, self.config.train.lr
        return lr * min(1.0, (step + 1) / warmup) if warmup else lr

    def batch(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 28, 28) on the device -> x_0 (B, 1, 28, 28) in model range and memory format."""
        return to_model_range(images_uint8, self.config.train.pixel_range).contiguous(memory_format=self.memory_format)

    def train_step(self, x_0: torch.Tensor) -> torch.Tensor:
        """One optimisation step on a clean batch x_0: draw t and ε, noise x_0 to x_t, regress ε̂ on ε
        (the book's MSE), step the optimizer and the EMA. Returns the loss, 0-d and unsynced."""
        lr = self.lr_at(self.step)
        # t in 1..T; x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (scheduler.add_noise, written out: its range
        # check would sync with the device every step, and it gathers from the float64 table)
        timesteps = torch.randint(1, len(self.alpha_bars) + 1, (len(x_0),), device=x_0.device)
        noise = torch.randn_like(x_0)
        alpha_bar = self.alpha_bars[timesteps - 1].view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            eps = self.forward(x_t, timesteps)
        loss = F.mse_loss(eps.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return loss

    # -- checkpoints ---------------------------------------------------------------------------------
    def weights_are_finite(self) -> bool:
        """One device sync: every parameter (and EMA parameter) finite."""
        params = list(self.model.parameters()) + (list(self.ema.model.parameters()) if self.ema else [])
        return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())

    def save_checkpoint(self, run_dir: Path, epoch: int, elapsed_s: float) -> None:
        """Write a complete checkpoint (see `checkpoint.write`); refuses non-finite weights, which
        would replace the last good checkpoint with one that samples black images."""
        if not self.weights_are_finite():
            raise TrainingDiverged(_divergence_message("the weights became NaN or infinite", self.step, self.config))
        meta = {"step": self.step, "epoch": epoch}
        blobs = {"model.safetensors": weights_bytes(self.model, meta)}
        if self.ema is not None:
            blobs["ema.safetensors"] = weights_bytes(self.ema.model, meta)
        blobs["optimizer.safetensors"] = optimizer_bytes(self.optimizer)
        hardware = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"cpu ({torch.get_num_threads()} threads)"
        checkpoint.write(run_dir, blobs, step=self.step, epoch=epoch, elapsed_s=elapsed_s,
                         meta={"hardware": hardware, "torch": torch.__version__})

    def load_checkpoint(self, run_dir: Path) -> float:
        """Restore weights, EMA, optimizer and step from the run's last complete checkpoint (the one
        before when the newest is torn); returns the training time it had used. A run that never
        checkpointed starts over."""
        name = run_dir.name
        saved = checkpoint.latest(run_dir, name)
        if saved is None:
            return 0.0
        blobs = saved.blobs
        load_weights_bytes(blobs["model.safetensors"], "model.safetensors", self.model, name)
        if self.ema is not None:
            ema = "ema.safetensors" if "ema.safetensors" in blobs else "model.safetensors"
            load_weights_bytes(blobs[ema], ema, self.ema.model, name)
        if "optimizer.safetensors" in blobs:
            load_optimizer_bytes(blobs["optimizer.safetensors"], "optimizer.safetensors", self.optimizer, name)
        self.step = saved.step
        return saved.elapsed_s


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    return max(1, n_images // batch_size)  # drop the ragged last batch: every step sees a full batch


def total_steps_for(config: RunConfig, n_images: int) -> int:
    per_epoch = steps_per_epoch(n_images, config.train.batch_size)
    limits = [config.train.epochs * per_epoch] if config.train.epochs else []
    if config.train.max_steps:
        limits.append(config.train.max_steps)
    return min(limits) if limits else 0  # 0: bounded by the time budget alone


def _divergence_message(symptom: str, step: int, config: RunConfig) -> str:
    decay = config.train.lr * config.train.weight_decay
    if config.train.optimizer == "adamw" and decay > 1:
        # AdamW multiplies the weights by (1 - lr·wd) each step: past 1 that factor flips their sign,
        # past 2 it grows them geometrically until they overflow.
        hint = (f"lr × weight_decay = {decay:g} > 1, so AdamW's decoupled decay multiplies the weights by "
                f"{1 - decay:g} every step and they blow up; lower lr or weight_decay (e.g. 2e-3 and 0.01)")
    else:
        hint = (f"the learning rate ({config.train.lr:g}) is probably too high; try 10x lower"
                if config.train.lr > 3e-3 else
                "try a lower learning rate or gradient clipping (--grad-clip 1.0)")
    return f"{symptom} at step {step}: training diverged; {hint}"


def train_run(run_dir: Path, *, resume: bool = False, images: ImageSet | None = None,
              data_root: str | None = None, on_progress: ProgressFn | None = None,
              stop_event: threading.Event | None = None, lock: runs.RunLock | None = None) -> Progress:
    """Train the run in `run_dir` (created with runs.create_run) until it finishes or is stopped.

    Holds the run's lock for the whole job (taking it first thing, unless the caller passes the
    lock it already holds), so a second trainer of the same run is refused with `runs.RunBusy`.
    Returns the final Progress; raises on failure after marking the run failed in status.json.
    """
    run_dir = Path(run_dir)
    with lock or runs.RunLock(run_dir):
        checkpoint.remove_stale_temp_files(run_dir)
        config = runs.load_config(run_dir)
        if (run_dir / "samples").is_symlink():  # grids are written there: never through a planted link
            checkpoint.real_folder(run_dir / "samples")
        progress = Progress(run_name=run_dir.name, run_dir=str(run_dir))
        try:
            return _train(run_dir, config, resume, images, data_root, on_progress, stop_event, progress)
        except BaseException as exc:
            if is_disk_full(exc):
                folder = Path(exc.filename).parent if getattr(exc, "filename", None) else run_dir
                raised: BaseException = DiskFull(f"disk full in {folder} ({exc.strerror}); the last complete "
                                                 "checkpoint is kept: free some space, then resume the run")
            else:
                raised = exc
            message = str(raised) if isinstance(raised, (TrainingDiverged, ConfigError, RunError, DiskFull)) else \
                f"{type(raised).__name__}: {raised}"
            progress.state, progress.error = "failed", message
            runs.write_status(run_dir, "failed", error=message, step=progress.step)
            if on_progress:
                on_progress(progress)
            if raised is exc:
                raise
            raise raised from None


def _train(run_dir: Path, config: RunConfig, resume: bool, images: ImageSet | None, data_root: str | None,
           on_progress: ProgressFn | None, stop_event: threading.Event | None, progress: Progress) -> Progress:
    train = config.train
    device = resolve_device(train.device)
    budget.check_training_fits(config, device)  # before a byte is allocated: a shared config may ask for 100s of GB
    progress.device = str(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 28x28 shapes: autotuning pays off at once

    def report() -> None:
        if on_progress:
            on_progress(progress)

    progress.message = "loading data"
    report()
    if images is None:
        images = load_images(train.dataset, "train", data_root)
    data = images.images[: train.limit_images] if train.limit_images else images.images
    if not torch.is_tensor(data) or data.dtype != torch.uint8 or tuple(data.shape[1:]) != (28, 28):
        # Floats in [0, 1] would be divided by 255 again and train on near-black images, silently.
        got = f"{data.dtype} {tuple(data.shape)}" if torch.is_tensor(data) else type(data).__name__
        raise ConfigError(f"images = {got} is not allowed: training expects uint8 images of shape "
                          "(N, 28, 28) with pixels 0..255 (see core.data.ImageSet)")
    if train.batch_size > len(data):
        raise ConfigError(f"batch_size = {train.batch_size} is not allowed: it exceeds the {len(data)} "
                          "training images; lower it")
    data = data.to(device)  # the whole dataset as one uint8 tensor on the device (47 MB for 60k)
    per_epoch = steps_per_epoch(len(data), train.batch_size)
    total = total_steps_for(config, len(data))

    trainer = Trainer(config, device)
    elapsed_before = 0.0
    if resume:
        elapsed_before = trainer.load_checkpoint(run_dir)
        runs.truncate_metrics(run_dir, trainer.step)
    metrics = runs.MetricsWriter(run_dir / "metrics.csv")
    for row in runs.read_metrics(run_dir):
        progress.steps.append(int(row["step"]))
        progress.losses.append(row["loss"])

    progress.total_steps, progress.step, progress.epochs = total, trainer.step, train.epochs
    progress.state, progress.message = "running", ""
    runs.write_status(run_dir, "running", step=trainer.step)
    report()

    start_time = time.perf_counter()
    last_checkpoint = last_heartbeat = start_time
    # The first checkpoint comes early, so a run killed in its first minutes still resumes.
    first_checkpoint_due = trainer.step == 0 and not checkpoint.exists(run_dir)
    # Non-finite losses are collected on the device (no sync per step on a GPU) and checked at every
    # log row and before every checkpoint; on the CPU a check costs nothing, so it happens every step.
    diverged = torch.zeros((), dtype=torch.bool, device=device)
    check_every_step = device.type == "cpu"
    window_loss, window_count, window_start, window_images = 0.0, 0, start_time, 0
    gen = torch.Generator(device="cpu")

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start_time

    def check_finite() -> None:
        if bool(diverged):  # one device sync
            raise TrainingDiverged(_divergence_message("loss became nan or inf", trainer.step, config))

    saved_at: list[int] = []  # steps checkpointed by this job

    def save(epoch: int) -> None:
        check_finite()
        trainer.save_checkpoint(run_dir, epoch, elapsed())
        saved_at.append(trainer.step)

    def out_of_budget() -> bool:
        return (total and trainer.step >= total) or (train.time_budget_s and elapsed() >= train.time_budget_s)

    def preview(filename: str) -> None:
        progress.latest_grid = str(_preview_grid(run_dir, trainer, filename))
        report()

    stopped = False
    epoch = trainer.step // per_epoch
    try:
        while not out_of_budget():
            # The permutation of an epoch depends only on (seed, epoch), so a resumed run
            # continues the very same epoch where the checkpoint left it.
            gen.manual_seed(train.seed * 100_003 + epoch)
            order = torch.randperm(len(data), generator=gen).to(device)
            first = max(0, trainer.step - epoch * per_epoch)
            progress.epoch = epoch + 1
            for i in range(first, per_epoch):
                if stop_event is not None and stop_event.is_set():
                    raise StopRequested
                idx = order[i * train.batch_size:(i + 1) * train.batch_size]
                loss = trainer.train_step(trainer.batch(data[idx]))
                if check_every_step:
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingDiverged(_divergence_message(f"loss became {value}", trainer.step, config))
                else:
                    diverged |= ~torch.isfinite(loss.detach())
                window_loss += loss.detach()
                window_count += 1
                window_images += len(idx)

                if trainer.step % train.log_every == 0 or trainer.step == total:
                    mean_loss = float(window_loss / window_count)  # one device sync per log row
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(_divergence_message(f"loss became {mean_loss}", trainer.step, config))
                    now = time.perf_counter()
                    ips = window_images / max(now - window_start, 1e-9)
                    metrics.write({"step": trainer.step, "epoch": epoch + 1, "loss": mean_loss,
                                   "lr": trainer.lr_at(trainer.step - 1), "elapsed_s": elapsed(),
                                   "images_per_s": ips})
                    progress.steps.append(trainer.step)
                    progress.losses.append(mean_loss)
                    progress.step, progress.images_per_s, progress.elapsed_s = trainer.step, ips, elapsed()
                    progress.eta_s = _eta(progress, train.time_budget_s, train.batch_size)
                    window_loss, window_count, window_start, window_images = 0.0, 0, now, 0
                    report()
                    if now - last_heartbeat > 10:
                        runs.write_status(run_dir, "running", step=trainer.step)
                        last_heartbeat = now
                since = time.perf_counter() - last_checkpoint
                if (train.checkpoint_every_s and since >= train.checkpoint_every_s) or \
                        (first_checkpoint_due and since >= FIRST_CHECKPOINT_S):
                    save(epoch)
                    last_checkpoint, first_checkpoint_due = time.perf_counter(), False
                if out_of_budget():
                    break
            else:
                epoch += 1
                save(epoch)
                last_checkpoint, first_checkpoint_due = time.perf_counter(), False
                if train.sample_every_epochs and epoch % train.sample_every_epochs == 0 and not out_of_budget():
                    preview(f"epoch_{epoch:03d}.png")
    except StopRequested:
        stopped = True
    finally:
        metrics.close()

    progress.step, progress.elapsed_s = trainer.step, elapsed()
    progress.state, progress.message = "stopping" if stopped else "running", "saving"
    report()
    if not saved_at or saved_at[-1] != trainer.step:  # an epoch end may have just saved this very step
        save(epoch)
    if trainer.step > 0:
        preview("final.png")
    progress.state, progress.message, progress.eta_s = ("stopped" if stopped else "finished"), "", 0.0
    runs.write_status(run_dir, progress.state, step=trainer.step)
    report()
    return progress


def _eta(progress: Progress, budget_s: float, batch: int) -> float | None:
    candidates = []
    if progress.total_steps and progress.images_per_s > 0:
        candidates.append((progress.total_steps - progress.step) * batch / progress.images_per_s)
    if budget_s:
        candidates.append(max(0.0, budget_s - progress.elapsed_s))
    return min(candidates) if candidates else None


def _preview_grid(run_dir: Path, trainer: Trainer, filename: str) -> Path:
    """A 4x4 grid from a fixed seed with the run's preview sampler, so epochs compare tile by tile."""
    train = trainer.config.train
    steps = 0 if train.grid_sampler == "ddpm" else min(train.grid_steps, trainer.scheduler.num_timesteps)
    result = sample(trainer.sampling_model, trainer.scheduler,
                    SampleConfig(sampler=train.grid_sampler, steps=steps, n=GRID_SAMPLES, seed=GRID_SEED),
                    pixel_range=train.pixel_range, clip_default=train.clip_denoised, device=trainer.device)
    return save_grid(run_dir / "samples" / filename, result.images, ncol=4)
