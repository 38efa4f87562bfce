"""The trainer (model, optimizer, EMA, one step) and the training loop (`train_run`).

Network, diffusion process and trainer are separate: the loop only draws batches, noises them
with the scheduler and regresses the model's ε̂ on ε (the book's MSE), or, as the run's objective
says, v̂ on v and / or with Min-SNR-γ weights. It writes everything to
the run folder, so the CLI and the dashboard share one engine, and a run killed at any moment
loses at most the work since its last checkpoint.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import contextlib

from ..models import budget
from ..store import checkpoint, runs
from ..config import ConfigError, RunConfig, SampleConfig
from ..data.datasets import ImageSet, to_model_range
from ..data.sources import load_run_images
from ..data.transforms import random_hflip
from ..device import autocast_for, resolve_device
from .distributed import World, all_reduce_sum, broadcast_module, broadcast_object, current_world, device_for, \
    is_peer_failure, peer_failure_message, wrap_model
from ..errors import RunError
from ..store.export import save_grid
from ..store.io import is_disk_full, load_optimizer_bytes, load_weights_bytes, optimizer_bytes, safetensors_metadata, weights_bytes
from ..diffusion.guidance import even_labels
from ..models import NO_LABEL, build_model
from ..diffusion.sampling import sample
from ..diffusion.schedule import NoiseScheduler

GRID_SAMPLES = 16
GRID_SEED = 1234
FIRST_CHECKPOINT_S = 30.0  # a run's first checkpoint comes after this long or its first epoch, if sooner
PREVIEW_GUIDANCE = 3.0  # the book's γ; a run trained without label dropout previews at γ = 1


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


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): the x_0-space weight min(SNR_t, γ) written for the target regressed.

    The MSE of ε̂ equals SNR_t times that of x̂0, and the MSE of v̂ equals (SNR_t + 1) times it, so
        ε-prediction: w_t = min(SNR_t, γ) / SNR_t       (≤ 1: only the low-noise steps are turned down)
        v-prediction: w_t = min(SNR_t, γ) / (SNR_t + 1)
    The ε form is computed as min(1, γ / SNR_t), which stays 1 where SNR_t underflows to 0.
    """
    if prediction == "v":
        return snr.clamp(max=gamma) / (snr + 1)
    return (gamma / snr).clamp(max=1.0)


class Trainer:
    """Everything one optimisation step needs, built once from a run's config: the model (in its
    memory format, optionally compiled), the optimizer, the EMA, the learning-rate schedule, the
    float32 ᾱ table on the device and the autocast context.

    The training loop and `python -m core bench` both build this and call `train_step`, so the
    benchmark times exactly what trains.

    Under torchrun (an open process group) the model is wrapped in DistributedDataParallel, which
    averages the gradients of all ranks in backward; `model` stays the bare module, which the
    optimizer, the EMA, the checkpoints and sampling use. Rank 0 alone keeps the EMA: it alone writes.
    """

    def __init__(self, config: RunConfig, device: torch.device, world: World | None = None):
        train = config.train
        self.world = world if world is not None else current_world()
        torch.manual_seed(train.seed)  # the same initial weights for the same seed, loop, bench or rank
        self.config, self.device = config, device
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        self.model = build_model(config.model).to(device).to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, config)
        self.ema = EMA(self.model, train.ema_decay) if train.ema_decay > 0 and self.world.is_main else None
        # DDP first, then compile: compiling the wrapper lets DDP's bucketed all-reduce overlap backward.
        wrapped = wrap_model(self.model, device, self.world)
        self.forward = torch.compile(wrapped) if train.compile else wrapped
        if self.world.rank > 0:
            # Every rank drew the same initial weights; each now draws its own t and ε, or all ranks
            # would noise their different images with the very same timesteps and noise.
            torch.manual_seed((train.seed * 1_000_003 + self.world.rank) % 2**63)
        self.scheduler = NoiseScheduler(config.schedule)
        # float32 on the device, gathered per step; the scheduler keeps float64 for sampling
        self.alpha_bars = self.scheduler.alpha_bars.to(device=device, dtype=torch.float32)
        self.autocast = autocast_for(device)
        self.step = 0  # optimisation steps taken so far
        self.resumed_metadata: dict[str, str] = {}  # the loaded checkpoint's weights metadata, on resume
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
        """uint8 (B, C, H, W) on the device -> x_0 (B, C, H, W) in model range and memory format;
        with --hflip each image is mirrored with probability 1/2."""
        x_0 = to_model_range(images_uint8, self.config.train.pixel_range)
        if self.config.data.hflip:
            x_0 = random_hflip(x_0)
        return x_0.contiguous(memory_format=self.memory_format)

    def drop_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Classifier-free guidance's label dropout, so one network also learns ε̂(x_t, t, ∅).

        "batch" (the book's step 10): the whole batch trains without labels with probability p.
        "sample": each label is replaced by NO_LABEL with probability p, so every batch trains both
        tasks. For the book's UNet NO_LABEL adds no embedding, exactly what `labels=None` does for
        that sample; the ImprovedUNet maps it to its learned null token.
        """
        p = self.config.train.label_dropout
        if labels is None or not self.config.model.conditional or p == 0:
            return labels
        if self.config.train.label_dropout_mode == "batch":
            return None if torch.rand(()) < p else labels
        dropped = torch.rand(labels.shape, device=labels.device) < p
        return torch.where(dropped, NO_LABEL, labels)

    def train_step(self, x_0: torch.Tensor, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step on a clean batch x_0: draw t and ε (unless given, as a test of
        equivalence does), noise x_0 to x_t, regress the network's output on its target (ε with the
        book's MSE unless the run's objective says otherwise, see `loss`), step the optimizer and
        the EMA. Returns this rank's loss, 0-d and unsynced. A conditional run passes the batch's
        labels (B,); they are dropped as `drop_labels` says."""
        lr = self.lr_at(self.step)
        # t in 1..T; x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (scheduler.add_noise, written out: its range
        # check would sync with the device every step, and it gathers from the float64 table)
        if timesteps is None:
            timesteps = torch.randint(1, len(self.alpha_bars) + 1, (len(x_0),), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        alpha_bars = self.alpha_bars[timesteps - 1]  # (B,)
        alpha_bar = alpha_bars.view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast:
            if self.config.model.conditional:
                model_output = self.forward(x_t, timesteps, self.drop_labels(labels))
            else:  # the unconditional call stays the step-9 one, draw for draw
                model_output = self.forward(x_t, timesteps)
        loss = self.loss(model_output.float(), x_0, noise, alpha_bars)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        return loss

    def loss(self, model_output: torch.Tensor, x_0: torch.Tensor, noise: torch.Tensor,
             alpha_bars: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch; alpha_bars (B,) holds ᾱ_t of each sample.

        target: ε (the book) or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0 (Salimans & Ho 2022). Without
        Min-SNR-γ it is the plain MSE; the book's case is exactly `F.mse_loss(ε̂, ε)`, as it always was.
        With γ > 0 each sample's MSE is weighted by `min_snr_weight`.
        """
        train = self.config.train
        if train.prediction == "v":
            alpha_bar = alpha_bars.view(-1, 1, 1, 1)
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x_0
        else:
            target = noise
        if not train.min_snr_gamma:
            return F.mse_loss(model_output, target)
        snr = alpha_bars / (1 - alpha_bars)  # SNR_t = ᾱ_t / (1 − ᾱ_t), (B,)
        per_sample = (model_output - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        return (min_snr_weight(snr, train.min_snr_gamma, train.prediction) * per_sample).mean()

    # -- checkpoints ---------------------------------------------------------------------------------
    def weights_are_finite(self) -> bool:
        """One device sync: every parameter (and EMA parameter) finite."""
        params = list(self.model.parameters()) + (list(self.ema.model.parameters()) if self.ema else [])
        return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())

    def save_checkpoint(self, run_dir: Path, epoch: int, elapsed_s: float, epoch_images: int | None = None) -> None:
        """Write a complete checkpoint (see `checkpoint.write`). Rank 0's job alone (the weights are
        the same on every rank). Refuses non-finite weights, which would replace the last good
        checkpoint with one that samples black images. `epoch_images`: how many images of the
        current epoch's permutation were consumed, so a resume under another world size (another
        global batch) continues at the very same image."""
        if not self.weights_are_finite():
            raise TrainingDiverged(_divergence_message("the weights became NaN or infinite", self.step, self.config))
        meta = {"step": self.step, "epoch": epoch, "world_size": self.world.size,
                "global_batch_size": self.config.train.batch_size * self.world.size}
        if epoch_images is not None:
            meta["epoch_images"] = epoch_images
        blobs = {"model.safetensors": weights_bytes(self.model, meta)}
        if self.ema is not None:
            blobs["ema.safetensors"] = weights_bytes(self.ema.model, meta)
        blobs["optimizer.safetensors"] = optimizer_bytes(self.optimizer)
        hardware = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            f"cpu ({torch.get_num_threads()} threads)"
        checkpoint.write(run_dir, blobs, step=self.step, epoch=epoch, elapsed_s=elapsed_s,
                         meta={"hardware": hardware, "torch": torch.__version__, "world_size": self.world.size},
                         position=meta)

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
        # where in its epoch the loaded checkpoint stood (torchrun runs record it; see _checkpoint_position)
        self.resumed_metadata = safetensors_metadata(blobs["model.safetensors"])
        return saved.elapsed_s

    def sync_from_main(self) -> None:
        """After rank 0 alone read a checkpoint: its weights, optimizer state (Adam's moments and step
        count) and step on every rank, so all ranks take identical optimizer steps from here."""
        if not self.world.distributed:
            return
        broadcast_module(self.model, self.world)
        state = self.optimizer.state_dict() if self.world.is_main else None
        if state is not None:  # pickled for the wire on CPU: a CUDA tensor would land on rank 0's GPU
            state = {"state": {k: {n: v.cpu() if torch.is_tensor(v) else v for n, v in entry.items()}
                               for k, entry in state["state"].items()},
                     "param_groups": state["param_groups"]}
        state, self.step = broadcast_object((state, self.step), self.world)
        if not self.world.is_main:
            self.optimizer.load_state_dict(state)


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per pass over the data at a global batch of batch_size × world_size. The
    ragged tail is dropped: every step sees a full batch on every rank."""
    return max(1, n_images // (batch_size * world_size))


def check_data_fits(n_images: int, batch_size: int, world_size: int = 1) -> None:
    """Every rank needs at least one full batch per epoch, or the epoch has no step at all."""
    if batch_size * world_size <= n_images:
        return
    if world_size == 1:
        raise ConfigError(f"batch_size = {batch_size} is not allowed: it exceeds the {n_images} training images; "
                          "lower it")
    raise ConfigError(f"batch_size = {batch_size} per process × {world_size} processes = {batch_size * world_size} "
                      f"is not allowed: it exceeds the {n_images} training images, so some rank would get no "
                      "batch; lower --batch-size or the number of processes")


def total_steps_for(config: RunConfig, n_images: int, world_size: int = 1, *, step: int = 0, epoch: int = 0,
                    epoch_images: int = 0) -> int:
    """The step a run ends at: after `epochs` passes or at max_steps, whichever comes first; 0 when
    the time budget alone bounds it. Counted on from a position (step, completed epochs, images of
    the current epoch consumed), so a run resumed at another global batch still ends at its epoch."""
    train = config.train
    global_batch = train.batch_size * world_size
    limits = []
    if train.epochs:
        left = 0 if epoch >= train.epochs else \
            (n_images - epoch_images) // global_batch + (train.epochs - epoch - 1) * (n_images // global_batch)
        limits.append(step + left)
    if train.max_steps:
        limits.append(train.max_steps)
    return min(limits) if limits else 0


def _checkpoint_position(meta: dict[str, str], step: int, n_images: int, batch_size: int) -> tuple[int, int]:
    """(completed epochs, images of the current epoch consumed) at the checkpoint of `step`, from the
    loaded weights' metadata."""
    try:
        epoch, epoch_images = int(meta["epoch"]), int(meta["epoch_images"])
        if epoch < 0 or not 0 <= epoch_images <= n_images:
            raise ValueError("out of range")
        return epoch, epoch_images
    except (KeyError, ValueError):
        # A checkpoint from before world sizes existed was written by one process at `batch_size`.
        per_epoch = steps_per_epoch(n_images, batch_size)
        epoch = step // per_epoch
        return epoch, (step - epoch * per_epoch) * batch_size


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

    Holds the run's lock for the whole job (taking it first thing, unless the caller passes the lock
    it already holds), so a second trainer of the same run is refused with `runs.RunBusy`. Returns
    the final Progress; raises on failure after marking the run failed in status.json (or
    interrupted, when another rank of a torchrun job died). Under torchrun every rank calls this;
    rank 0 alone locks, reads and writes the run folder and sends the others what they need.
    """
    run_dir = Path(run_dir)
    world = current_world()
    held = (lock or runs.RunLock(run_dir)) if world.is_main else contextlib.nullcontext()
    with held:
        config = None
        if world.is_main:  # a missing folder raises here, before any status could be written
            checkpoint.remove_stale_temp_files(run_dir)
            config = runs.load_config(run_dir)
            if (run_dir / "samples").is_symlink():  # grids are written there: never through a planted link
                checkpoint.real_folder(run_dir / "samples")
        if world.distributed:
            config = RunConfig.from_json(broadcast_object(config.to_json() if config else None, world))
        progress = Progress(run_name=run_dir.name, run_dir=str(run_dir))
        try:
            return _train(run_dir, config, resume, images, data_root, on_progress, stop_event, progress, world)
        except BaseException as exc:
            peer_failed = is_peer_failure(exc)
            if is_disk_full(exc):
                folder = Path(exc.filename).parent if getattr(exc, "filename", None) else run_dir
                raised: BaseException = DiskFull(f"disk full in {folder} ({exc.strerror}); the last complete "
                                                 "checkpoint is kept: free some space, then resume the run")
            else:
                raised = exc
            message = peer_failure_message(exc) if peer_failed else \
                str(raised) if isinstance(raised, (TrainingDiverged, ConfigError, RunError, DiskFull)) else \
                f"{type(raised).__name__}: {raised}"
            progress.state, progress.error = "failed", message
            if world.is_main:
                # A dead peer is not this run's fault: it shows as interrupted and resumes from its checkpoint.
                runs.write_status(run_dir, "interrupted" if peer_failed else "failed", error=message,
                                  step=progress.step)
            if on_progress:
                on_progress(progress)
            if raised is exc:
                raise
            raise raised from None


def _train(run_dir: Path, config: RunConfig, resume: bool, images: ImageSet | None, data_root: str | None,
           on_progress: ProgressFn | None, stop_event: threading.Event | None, progress: Progress,
           world: World) -> Progress:
    train = config.train
    device = device_for(world, resolve_device(train.device))
    budget.check_training_fits(config, device)  # before a byte is allocated: a shared config may ask for 100s of GB
    progress.device = str(device) if not world.distributed else f"{world.size} × {device.type}"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one fixed image shape per run: autotuning pays off at once
    writes = world.is_main  # rank 0 alone touches the run folder

    def report() -> None:
        if on_progress:
            on_progress(progress)

    progress.message = "loading data"
    report()
    if images is None:
        images = load_run_images(config.data, "train", data_root)
    data = images.images[: train.limit_images] if train.limit_images else images.images
    if not torch.is_tensor(data) or data.dtype != torch.uint8 or tuple(data.shape[1:]) != config.data.shape:
        # Floats in [0, 1] would be divided by 255 again and train on near-black images, silently.
        got = f"{data.dtype} {tuple(data.shape)}" if torch.is_tensor(data) else type(data).__name__
        raise ConfigError(f"images = {got} is not allowed: training expects uint8 images of shape "
                          f"(N, {', '.join(map(str, config.data.shape))}) with pixels 0..255 (see core.data.ImageSet)")
    check_data_fits(len(data), train.batch_size, world.size)
    data = data.to(device)  # the whole dataset as one uint8 tensor on the device (47 MB for 60k)
    labels = _training_labels(images, len(data), config).to(device) if config.model.conditional else None
    batch, global_batch = train.batch_size, train.batch_size * world.size

    trainer = Trainer(config, device, world)
    elapsed_before, epoch, cursor = 0.0, 0, 0  # cursor: images of this epoch's permutation consumed
    if resume:
        if writes:
            elapsed_before = trainer.load_checkpoint(run_dir)
            if trainer.step > 0:
                epoch, cursor = _checkpoint_position(trainer.resumed_metadata, trainer.step, len(data), batch)
            runs.truncate_metrics(run_dir, trainer.step)
        trainer.sync_from_main()
        elapsed_before, epoch, cursor = broadcast_object((elapsed_before, epoch, cursor), world)
    total = total_steps_for(config, len(data), world.size, step=trainer.step, epoch=epoch, epoch_images=cursor)
    metrics = runs.MetricsWriter(run_dir / "metrics.csv") if writes else None
    for row in runs.read_metrics(run_dir) if writes else []:
        progress.steps.append(int(row["step"]))
        progress.losses.append(row["loss"])

    progress.total_steps, progress.step, progress.epochs = total, trainer.step, train.epochs
    progress.state, progress.message = "running", ""
    if writes:
        runs.write_status(run_dir, "running", step=trainer.step, world_size=world.size)
    report()

    start_time = time.perf_counter()
    last_checkpoint = last_heartbeat = start_time
    window_loss, window_count, window_start, window_images = 0.0, 0, start_time, 0
    gen = torch.Generator(device="cpu")
    time_up = False  # under torchrun all ranks agree on it at log rows, or one would wait for the others forever

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start_time

    # The first checkpoint comes early, so a run killed in its first minutes still resumes.
    first_checkpoint_due = writes and trainer.step == 0 and not checkpoint.exists(run_dir)
    # Non-finite losses are collected on the device (no sync per step on a GPU) and checked at every
    # log row and before every checkpoint; on the CPU a check costs nothing, so it happens every step.
    diverged = torch.zeros((), dtype=torch.bool, device=device)
    check_every_step = device.type == "cpu"
    saved_at: list[int] = []  # steps checkpointed by this job

    def save() -> None:
        if not writes:
            return
        if bool(diverged):  # one device sync
            raise TrainingDiverged(_divergence_message("loss became nan or inf", trainer.step, config))
        trainer.save_checkpoint(run_dir, epoch, elapsed(), epoch_images=cursor)
        saved_at.append(trainer.step)

    def budget_spent() -> bool:
        nonlocal time_up
        if not world.distributed:
            time_up = bool(train.time_budget_s and elapsed() >= train.time_budget_s)
        return bool(total and trainer.step >= total) or time_up

    def preview(filename: str) -> None:
        if writes:
            progress.latest_grid = str(_preview_grid(run_dir, trainer, filename))
            report()

    stopped = False
    try:
        while not budget_spent():
            # The permutation of an epoch depends only on (seed, epoch), so a resumed run continues
            # the very same epoch where the checkpoint left it. A step takes the next global batch
            # of it and each rank its own block of that: rank r the images cursor + r·B .. + (r+1)·B.
            # So ranks never share an image, and 2 ranks × B see the batches 1 process × 2B sees.
            gen.manual_seed(train.seed * 100_003 + epoch)
            order = torch.randperm(len(data), generator=gen).to(device)
            progress.epoch = epoch + 1
            while cursor + global_batch <= len(data):
                if not world.distributed and stop_event is not None and stop_event.is_set():
                    raise StopRequested
                first = cursor + world.rank * batch
                idx = order[first:first + batch]
                loss = trainer.train_step(trainer.batch(data[idx]), labels=None if labels is None else labels[idx])
                cursor += global_batch
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
                    now = time.perf_counter()
                    # One all-reduce per log row: Σ losses, Σ steps, Σ images/s over ranks, and whether
                    # any rank wants to stop; one device sync per row, as before.
                    wants_stop = (stop_event is not None and stop_event.is_set()) or \
                        bool(train.time_budget_s and elapsed() >= train.time_budget_s)
                    sums = torch.stack([torch.as_tensor(window_loss, dtype=torch.float64, device=device),
                                        *torch.tensor([window_count, window_images / max(now - window_start, 1e-9),
                                                       float(wants_stop)], dtype=torch.float64, device=device)])
                    loss_sum, count, ips, stops = all_reduce_sum(sums, world).tolist()
                    mean_loss = loss_sum / count  # the loss averaged over ranks
                    if not math.isfinite(mean_loss):
                        raise TrainingDiverged(_divergence_message(f"loss became {mean_loss}", trainer.step, config))
                    if world.distributed and stops > 0:  # every rank leaves the loop at this same step
                        if stop_event is not None and stop_event.is_set():
                            raise StopRequested
                        time_up = True
                    if writes:
                        metrics.write({"step": trainer.step, "epoch": epoch + 1, "loss": mean_loss,
                                       "lr": trainer.lr_at(trainer.step - 1), "elapsed_s": elapsed(),
                                       "images_per_s": ips})
                    progress.steps.append(trainer.step)
                    progress.losses.append(mean_loss)
                    progress.step, progress.images_per_s, progress.elapsed_s = trainer.step, ips, elapsed()
                    progress.eta_s = _eta(progress, train.time_budget_s, global_batch)
                    window_loss, window_count, window_start, window_images = 0.0, 0, now, 0
                    report()
                    if writes and now - last_heartbeat > 10:
                        runs.write_status(run_dir, "running", step=trainer.step, world_size=world.size)
                        last_heartbeat = now
                since = time.perf_counter() - last_checkpoint
                if (train.checkpoint_every_s and since >= train.checkpoint_every_s) or \
                        (first_checkpoint_due and since >= FIRST_CHECKPOINT_S):
                    save()
                    last_checkpoint, first_checkpoint_due = time.perf_counter(), False
                if budget_spent():
                    break
            else:
                epoch, cursor = epoch + 1, 0
                save()
                last_checkpoint, first_checkpoint_due = time.perf_counter(), False
                if train.sample_every_epochs and epoch % train.sample_every_epochs == 0 and not budget_spent():
                    preview(f"epoch_{epoch:03d}.png")
    except StopRequested:
        stopped = True
    finally:
        if metrics is not None:
            metrics.close()

    progress.step, progress.elapsed_s = trainer.step, elapsed()
    progress.state, progress.message = "stopping" if stopped else "running", "saving"
    report()
    if not saved_at or saved_at[-1] != trainer.step:  # an epoch end may have just saved this very step
        save()
    if trainer.step > 0:
        preview("final.png")
    progress.state, progress.message, progress.eta_s = ("stopped" if stopped else "finished"), "", 0.0
    if writes:
        runs.write_status(run_dir, progress.state, step=trainer.step, world_size=world.size)
    report()
    return progress


def _training_labels(images: ImageSet, n: int, config: RunConfig) -> torch.Tensor:
    """The class labels of the n training images in use, checked against the network's classes."""
    labels = images.labels[:n] if images.labels is not None else None
    if not torch.is_tensor(labels) or labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32):
        raise ConfigError("labels is not allowed: a conditional run needs one integer label per training image "
                          "(core.data.ImageSet.labels)")
    k = config.model.num_classes
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ConfigError(f"num_classes = {k} is not allowed: the training labels run from {int(labels.min())} "
                          f"to {int(labels.max())}")
    return labels.long()


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
    # A conditional run previews classes 0, 1, 2, ... in reading order, guided as the book samples.
    conditional = trainer.config.model.conditional
    result = sample(trainer.sampling_model, trainer.scheduler,
                    SampleConfig(sampler=train.grid_sampler, steps=steps, n=GRID_SAMPLES, seed=GRID_SEED),
                    pixel_range=train.pixel_range, clip_default=train.clip_denoised, device=trainer.device,
                    labels=even_labels(GRID_SAMPLES, trainer.config.model.num_classes) if conditional else None,
                    guidance=PREVIEW_GUIDANCE if conditional and train.label_dropout > 0 else 1.0,
                    prediction=train.prediction, shape=trainer.config.data.shape)
    return save_grid(run_dir / "samples" / filename, result.images, ncol=4)
