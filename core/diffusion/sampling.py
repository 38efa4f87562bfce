"""Generate images: one loop over the reverse steps of every sampler, as a generator.

`reverse_process` yields a `ReverseStep` (t, x_t, x̂0, and the next x) at each step of each batch,
like improved-diffusion's `p_sample_loop_progressive`. Everything else is a thin consumer of it:
`sample` keeps the final images (and frames, when asked), a caller that wants progress counts the
steps it receives, and a caller that wants to stop early stops iterating (`itertools.islice`).

Every sampler plugs into the same loop through a `Solver` (core/diffusion/solvers/, one file each):
DDPM (the book, every t), DDIM (any number of steps, η) and DPM-Solver++(2M) in its ODE and SDE
forms. Seeded per image (core/diffusion/noise.py: image i of seed s is the same whatever the batch)
and batched; runs under `torch.inference_mode` with the model put in eval mode once (the book
toggles eval()/train() at each of its 1000 steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..config import PREDICTION_NAMES, ConfigError, SampleConfig
from ..data.datasets import IMAGE_SHAPE, to_uint8
from ..device import resolve_device
from .guidance import guided
from .noise import ImageNoise
from .schedule import NoiseScheduler
from .solvers import StepOutput, make_solver

__all__ = ["Denoiser", "ReverseStep", "SampleResult", "StepOutput", "collect", "reverse_process", "sample",
           "total_steps"]

# The network as the loop sees it: (x_t (B,C,H,W), t (B,) long) -> its prediction (B,C,H,W), ε̂ or v̂
# as `prediction` says. A plain model fits; so does a wrapper that adds labels or guidance.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReverseStep:
    """One reverse step of one batch: the sampler was at `t` with `x_t` and moved to `x_next`."""
    batch_start: int           # index of the batch's first image among all N
    index: int                 # 0-based step number within the batch
    num_steps: int             # steps per batch
    t: int                     # timestep in 1..T
    x_t: torch.Tensor          # (B,C,H,W) model range, before the step
    pred_x0: torch.Tensor      # x̂0 predicted at t (clipped where the sampler clips)
    x_next: torch.Tensor       # after the step; after the last step, the batch's final images

    @property
    def last(self) -> bool:
        return self.index == self.num_steps - 1


def reverse_process(model: Denoiser, scheduler: NoiseScheduler, config: SampleConfig = SampleConfig(), *,
                    pixel_range: str = "unit", clip_default: bool = False, device: torch.device | str = "cpu",
                    channels_last: bool = False, labels: torch.Tensor | None = None,
                    guidance: float = 1.0, prediction: str = "eps",
                    shape: tuple[int, int, int] = IMAGE_SHAPE) -> Iterator[ReverseStep]:
    """Run the reverse process for `config.n` images of `shape` (C, H, W; the run's `config.data.shape`)
    in batches, yielding every step.

    `model` is an nn.Module (put in eval mode for the duration, restored after) or any Denoiser.
    channels_last is off by default: it does not pay for sampling (the bench measures it).
    `labels` (n,) makes it class-conditional: each batch samples a conditional network guided
    towards its slice of the labels at scale `guidance` (core.guidance); None is unconditional.
    `prediction` is what the network was trained to predict (the run's `train.prediction`): its
    output becomes ε̂ here, once, before any Solver sees it, so every sampler handles every target.
    """
    if prediction not in PREDICTION_NAMES:
        raise ConfigError(f"prediction = {prediction!r} is not allowed: choose one of {', '.join(PREDICTION_NAMES)}")
    if labels is not None and len(labels) != config.n:
        raise ConfigError(f"labels = {len(labels)} labels is not allowed: give one per sample (n = {config.n})")
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(f"shape = {shape!r} is not allowed: give (channels, height, width) as whole numbers")
    device = resolve_device(device)
    solver = make_solver(scheduler, config, pixel_range=pixel_range, clip_default=clip_default)
    timesteps = solver.timesteps
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.inference_mode():
            for start in range(0, config.n, config.batch_size):
                b = min(config.batch_size, config.n - start)
                noise = ImageNoise(config.seed, start, b, tuple(shape), device)
                x = noise().contiguous(memory_format=memory_format)  # x_T: each image's first draw
                solver.reset()
                denoise = model if labels is None else guided(model, labels[start:start + b].to(device), guidance)
                for index, t in enumerate(timesteps):
                    t_batch = torch.full((b,), t, device=device, dtype=torch.long)
                    model_output = denoise(x, t_batch).float()
                    # Guidance mixed the outputs linearly, with weights summing to 1, and for a fixed
                    # x_t the conversion to ε̂ is affine in the output: guiding v̂ equals guiding ε̂.
                    eps = scheduler.pred_eps(model_output, x, t_batch, prediction)
                    out = solver.step(eps, index, x, noise)
                    yield ReverseStep(start, index, len(timesteps), t, x, out.pred_original_sample, out.prev_sample)
                    x = out.prev_sample
    finally:
        if module is not None:
            module.train(was_training)


def total_steps(config: SampleConfig, scheduler: NoiseScheduler) -> int:
    """How many `ReverseStep`s `reverse_process` yields for `config` (steps × batches)."""
    per_batch = scheduler.num_timesteps if config.sampler == "ddpm" else config.resolved_steps(scheduler.num_timesteps)
    return per_batch * ((config.n + config.batch_size - 1) // config.batch_size)


# -- consumers ---------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    images: np.ndarray                      # uint8 (N, C, H, W)
    frame_timesteps: list[int] = field(default_factory=list)  # t of each recorded frame, descending
    frames_xt: np.ndarray | None = None     # uint8 (K, N, C, H, W): x_t before the step at that t
    frames_x0: np.ndarray | None = None     # uint8 (K, N, C, H, W): x̂0 predicted at that t


def collect(steps: Iterable[ReverseStep], *, pixel_range: str, record: str | Iterable[int] = "none") -> SampleResult:
    """Consume a reverse process: the final images, and x_t / x̂0 frames at the recorded timesteps.

    record: "none", "all" (every step), or an iterable of timesteps to keep (others are skipped).
    """
    if isinstance(record, str) and record not in ("none", "all"):
        raise ConfigError(f"record = {record!r} is not allowed: use 'none', 'all' or a list of timesteps")
    wanted = None if record == "all" else set() if record == "none" else {int(t) for t in record}
    images, xt_frames, x0_frames, frame_t = [], [], [], []
    batch_xt, batch_x0 = [], []
    for step in steps:
        if wanted is None or step.t in wanted:
            batch_xt.append(to_uint8(step.x_t, pixel_range).cpu())
            batch_x0.append(to_uint8(step.pred_x0, pixel_range).cpu())
            if step.batch_start == 0:
                frame_t.append(step.t)
        if step.last:
            images.append(to_uint8(step.x_next, pixel_range).cpu())
            if batch_xt:
                xt_frames.append(torch.stack(batch_xt))  # (K, b, C, H, W)
                x0_frames.append(torch.stack(batch_x0))
            batch_xt, batch_x0 = [], []
    # A reverse process stopped before any batch ended has no images yet.
    final = torch.cat(images).numpy() if images else np.zeros((0, *IMAGE_SHAPE), np.uint8)
    result = SampleResult(images=final, frame_timesteps=frame_t)
    if xt_frames:
        result.frames_xt = torch.cat(xt_frames, dim=1).numpy()
        result.frames_x0 = torch.cat(x0_frames, dim=1).numpy()
    return result


def sample(model: Denoiser, scheduler: NoiseScheduler, config: SampleConfig = SampleConfig(), *,
           pixel_range: str = "unit", clip_default: bool = False, device: torch.device | str = "cpu",
           record: str | Iterable[int] = "none", channels_last: bool = False,
           labels: torch.Tensor | None = None, guidance: float = 1.0, prediction: str = "eps",
           shape: tuple[int, int, int] = IMAGE_SHAPE) -> SampleResult:
    """The final images of `config.n` samples (and frames, see `collect`); labels, prediction, shape:
    see reverse_process."""
    steps = reverse_process(model, scheduler, config, pixel_range=pixel_range, clip_default=clip_default,
                            device=device, channels_last=channels_last, labels=labels, guidance=guidance,
                            prediction=prediction, shape=shape)
    return collect(steps, pixel_range=pixel_range, record=record)
