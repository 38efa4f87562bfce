"""Where along the diffusion a model is good or bad: the training loss measured per timestep bucket.

The training curve mixes every t into one number. Splitting the same ε-prediction MSE by t shows
what a change (model, optimizer) improved: the low-noise end (details) or the high-noise end
(layout). The batch, the timesteps and the noise are all fixed by `seed`, so two runs with the
same T are scored on exactly the same problems.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data.datasets import to_model_range
from ..diffusion.schedule import NoiseScheduler


@dataclass(frozen=True)
class BucketLoss:
    t_low: int      # first timestep of the bucket (inclusive)
    t_high: int     # last timestep of the bucket (inclusive)
    loss: float     # mean ε-prediction MSE over the batch at timesteps drawn from [t_low, t_high]
    # MSE of the predicted clean image x̂0 (clipped to the data range) against x_0, in [0, 1] pixel
    # units: comparable between runs of different pixel ranges, where the ε-loss is not.
    x0_loss: float = float("nan")


def timestep_buckets(timesteps: int, buckets: int) -> list[tuple[int, int]]:
    """Split 1..T into `buckets` contiguous ranges of (nearly) equal length."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= timesteps:
        raise ConfigError(f"buckets = {buckets!r} is not allowed: it must be a whole number from 1 to "
                          f"T = {timesteps}")
    edges = torch.linspace(0, timesteps, buckets + 1, dtype=torch.float64).round().long().tolist()
    return [(lo + 1, hi) for lo, hi in zip(edges[:-1], edges[1:])]


@torch.inference_mode()
def loss_by_timestep(model: nn.Module, scheduler: NoiseScheduler, images: torch.Tensor, *,
                     pixel_range: str, buckets: int = 10, seed: int = 0,
                     device: torch.device | str = "cpu", prediction: str = "eps") -> list[BucketLoss]:
    """The MSE between ε and the model's ε̂ on a fixed batch, one number per timestep bucket.

    `prediction` is the run's target: a v-prediction run's output is converted to ε̂ first
    (NoiseScheduler.pred_eps), so the figures compare with ε-prediction runs.

    images: uint8 (N, C, H, W) (or (N, H, W), one channel), e.g. the first N test images. Every bucket
    uses all N images, each at its own t drawn uniformly from the bucket, with noise fixed by `seed`.
    """
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.dtype != torch.uint8 or len(images) == 0:
        raise ConfigError(f"images of shape {tuple(images.shape)} and dtype {images.dtype} are not "
                          "allowed: give uint8 images of shape (N, C, H, W) with N >= 1")
    device = torch.device(device)
    x_0 = to_model_range(images, pixel_range).to(device)  # (N, C, H, W)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    results = []
    try:
        for t_low, t_high in timestep_buckets(scheduler.num_timesteps, buckets):
            t = torch.randint(t_low, t_high + 1, (len(images),), generator=gen)
            noise = torch.randn(x_0.shape, generator=gen).to(device)
            x_t = scheduler.add_noise(x_0, t.to(device), noise)
            eps = scheduler.pred_eps(model(x_t, t.to(device)).float(), x_t, t.to(device), prediction)
            low = -1.0 if pixel_range == "symmetric" else 0.0
            x0_hat = scheduler.pred_x0(x_t, t.to(device), eps).clamp(low, 1.0)
            width = 1.0 - low  # to [0, 1] pixel units
            results.append(BucketLoss(t_low, t_high, float(F.mse_loss(eps, noise)),
                                      float(F.mse_loss(x0_hat / width, x_0 / width))))
    finally:
        model.train(was_training)
    return results
