"""The Trainer: model, optimizer, EMA, one optimisation step, and its state to and from a checkpoint.

Network, diffusion process and trainer are separate: a step noises a clean batch with the
scheduler's ᾱ table and regresses the model's ε̂ on ε (the book's MSE), or, as the run's objective
says, v̂ on v and / or with Min-SNR-γ weights. The loop (`loop.py`) decides which images and when.

Random draws: every step takes its t, ε and label dropout from a generator seeded by
(seed, rank, step) alone (`step_seed`), counter-based as Philox-style samplers do (and, for a
network with dropout, reseeds the global generator nn.Dropout draws from the same way). The stream of a
step therefore depends on nothing that came before it, so a resumed run draws at step s exactly
what the run that never stopped drew, and the checkpoint's step is the whole random state. (The data
order is seeded by (seed, epoch) in the loop, the position within the epoch is in the checkpoint.)
"""
from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..data.datasets import to_model_range
from ..data.transforms import random_hflip
from ..device import autocast_for
from ..diffusion.schedule import NoiseScheduler
from ..models import NO_LABEL, build_model
from ..store import checkpoint
from ..store.io import load_optimizer_bytes, load_weights_bytes, optimizer_bytes, safetensors_metadata, weights_bytes
from .distributed import World, broadcast_module, broadcast_object, current_world, wrap_model
from .progress import TrainingDiverged, divergence_message


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


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the random draws of optimisation step `step` on `rank`: a hash, so neighbouring
    steps and ranks get unrelated streams (seed + step would make rank 1's step s rank 0's s + 1)."""
    digest = hashlib.blake2b(f"ddpm-train/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Trainer:
    """Everything one optimisation step needs, built once from a run's config: the model (in its
    memory format, optionally compiled), the optimizer, the EMA, the learning-rate schedule, the
    float32 ᾱ table on the device, the autocast context and the generator of the step's draws.

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
        # t, ε and label dropout; reseeded at every step (see the module docstring), so each rank
        # noises its own images with its own draws and a resume continues the very same stream.
        self.generator = torch.Generator(device=device).manual_seed(step_seed(train.seed, self.world.rank, 0))
        self.scheduler = NoiseScheduler(config.schedule)
        # float32 on the device, gathered per step; the scheduler keeps float64 for sampling
        self.alpha_bars = self.scheduler.alpha_bars.to(device=device, dtype=torch.float32)
        self.autocast = autocast_for(device)
        self.step = 0  # optimisation steps taken so far
        self.resumed_metadata: dict[str, str] = {}  # the loaded checkpoint's weights metadata, on resume
        self.fallback_note: str | None = None  # set on resume when previous/ was loaded instead of the newest
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
        """uint8 (B, C, H, W) on the device -> x_0 in model range and memory format (`to_model_range`);
        with --hflip each image is mirrored with probability 1/2, drawn from (seed, rank, step) like
        every other draw of the step, so a resumed run flips the same images."""
        x_0 = to_model_range(images_uint8, self.config.train.pixel_range)
        if self.config.data.hflip:
            flips = torch.Generator().manual_seed(step_seed(self.config.train.seed, self.world.rank, self.step) ^ 2)
            x_0 = random_hflip(x_0, flips)
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
            return None if torch.rand((), device=self.device, generator=self.generator) < p else labels
        dropped = torch.rand(labels.shape, device=self.device, generator=self.generator) < p
        return torch.where(dropped, NO_LABEL, labels)

    def train_step(self, x_0: torch.Tensor, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step on a clean batch x_0: draw t and ε (unless given, as a test of
        equivalence does), noise x_0 to x_t, regress the network's output on its target (ε with the
        book's MSE unless the run's objective says otherwise, see `loss`), step the optimizer and
        the EMA. Returns this rank's loss, 0-d and unsynced. A conditional run passes the batch's
        labels (B,); they are dropped as `drop_labels` says."""
        loss = self.forward_backward(x_0, timesteps, noise, labels)
        self.optimize()
        return loss

    def forward_backward(self, x_0: torch.Tensor, timesteps: torch.Tensor | None = None,
                         noise: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one batch and its gradients (averaged over ranks by DDP in backward)."""
        seed = step_seed(self.config.train.seed, self.world.rank, self.step)
        self.generator.manual_seed(seed)
        if self.config.model.dropout > 0:  # nn.Dropout draws its masks from the global generator
            torch.manual_seed(seed ^ 1)
        # t in 1..T; x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (scheduler.add_noise, written out: its range
        # check would sync with the device every step, and it gathers from the float64 table)
        if timesteps is None:
            timesteps = torch.randint(1, len(self.alpha_bars) + 1, (len(x_0),), device=x_0.device,
                                      generator=self.generator)
        if noise is None:  # drawn in logical order, then laid out: the same ε whatever the memory format
            noise = torch.randn(x_0.shape, device=x_0.device, dtype=x_0.dtype, generator=self.generator)
            noise = noise.contiguous(memory_format=self.memory_format)
        alpha_bars = self.alpha_bars[timesteps - 1]  # (B,)
        alpha_bar = alpha_bars.view(-1, 1, 1, 1)
        x_t = alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * noise
        with self.autocast:
            if self.config.model.conditional:
                model_output = self.forward(x_t, timesteps, self.drop_labels(labels))
            else:  # the unconditional call stays the step-9 one, draw for draw
                model_output = self.forward(x_t, timesteps)
        loss = self.loss(model_output.float(), x_0, noise, alpha_bars)
        # Last step's gradients go only now: set_to_none frees them before backward allocates new ones.
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def optimize(self) -> None:
        """Clip, step the optimizer at this step's learning rate, count the step, update the EMA."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        if self.config.train.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)

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
            raise TrainingDiverged(divergence_message("the weights became NaN or infinite", self.step, self.config))
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
        if saved.fallback and self.world.is_main:  # said out loud: the newer steps are trained again
            print(f"note: run {name!r}: {saved.fallback_note}", file=sys.stderr, flush=True)
        self.fallback_note = saved.fallback_note
        blobs = saved.blobs
        load_weights_bytes(blobs["model.safetensors"], "model.safetensors", self.model, name)
        if self.ema is not None:
            ema = "ema.safetensors" if "ema.safetensors" in blobs else "model.safetensors"
            load_weights_bytes(blobs[ema], ema, self.ema.model, name)
        if "optimizer.safetensors" in blobs:
            load_optimizer_bytes(blobs["optimizer.safetensors"], "optimizer.safetensors", self.optimizer, name)
        self.step = saved.step
        # where in its epoch the loaded checkpoint stood (torchrun runs record it; see plan.checkpoint_position)
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
