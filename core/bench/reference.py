"""BENCHMARK REFERENCE ONLY: the book's step-9 implementation, as the book writes it.

This module exists so that `python -m core bench` can time the original code and the product
side by side in one run and report the speed-up as a ratio. Nothing in the product imports it.
It is written from the book's step 9 (data, schedule, network, loop, as the book gives them) and keeps its
slow habits on purpose:

- `pos_encoding` loops over the batch in Python and builds one vector per sample;
- the data come through a `DataLoader` that converts every image with `ToTensor()` on each draw;
- `Diffuser.denoise` toggles `model.eval()` / `model.train()` around every one of the T reverse
  steps and calls the model under `torch.no_grad()` (not `inference_mode`);
- tensors stay in the default (contiguous, NCHW) memory format and fp32, no autocast.

The network is layer for layer the book's UNet, with the same parameter names as
`core.models.unet.UNet`, so the same weights load into both (tests compare their outputs).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# -- network (the book's UNet) -----------------------------------------------------------------------
def _pos_encoding(time_idx: torch.Tensor, output_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One timestep -> (D,) sinusoidal vector, as the book builds it."""
    t, D = time_idx, output_dim
    v = torch.zeros(D, device=device)
    i = torch.arange(0, D, device=device)
    div_term = torch.exp(i / D * math.log(10000))
    v[0::2] = torch.sin(t / div_term[0::2])
    v[1::2] = torch.cos(t / div_term[1::2])
    return v


def pos_encoding(timesteps: torch.Tensor, output_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) timesteps -> (B, D), one Python iteration per sample (the book's loop)."""
    batch_size = len(timesteps)
    device = timesteps.device
    v = torch.zeros(batch_size, output_dim, device=device)
    for i in range(batch_size):
        v[i] = _pos_encoding(timesteps[i], output_dim, device)
    return v


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_embed_dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(),
        )
        self.mlp = nn.Sequential(
            nn.Linear(time_embed_dim, in_ch),
            nn.ReLU(),
            nn.Linear(in_ch, in_ch),
        )

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N, C, _, _ = x.shape
        v = self.mlp(v)
        v = v.view(N, C, 1, 1)
        y = self.convs(x + v)
        return y


class UNet(nn.Module):
    def __init__(self, in_ch: int = 1, time_embed_dim: int = 100):
        super().__init__()
        self.time_embed_dim = time_embed_dim
        self.down1 = ConvBlock(in_ch, 64, time_embed_dim)
        self.down2 = ConvBlock(64, 128, time_embed_dim)
        self.bot1 = ConvBlock(128, 256, time_embed_dim)
        self.up2 = ConvBlock(128 + 256, 128, time_embed_dim)
        self.up1 = ConvBlock(128 + 64, 64, time_embed_dim)
        self.out = nn.Conv2d(64, in_ch, 1)
        self.maxpool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        v = pos_encoding(timesteps, self.time_embed_dim, x.device)
        x1 = self.down1(x, v)
        x = self.maxpool(x1)
        x2 = self.down2(x, v)
        x = self.maxpool(x2)
        x = self.bot1(x, v)
        x = self.upsample(x)
        x = torch.cat([x, x2], dim=1)
        x = self.up2(x, v)
        x = self.upsample(x)
        x = torch.cat([x, x1], dim=1)
        x = self.up1(x, v)
        x = self.out(x)
        return x


# -- diffusion process (the book's Diffuser) ---------------------------------------------------------
class Diffuser:
    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 device: torch.device | str = "cpu"):
        self.num_timesteps = num_timesteps
        self.device = device
        self.betas = torch.linspace(beta_start, beta_end, num_timesteps, device=device)
        self.alphas = 1 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)

    def add_noise(self, x_0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.num_timesteps
        assert (t >= 1).all() and (t <= T).all()
        t_idx = t - 1  # alpha_bars[0] is for t = 1
        alpha_bar = self.alpha_bars[t_idx]
        N = alpha_bar.size(0)
        alpha_bar = alpha_bar.view(N, 1, 1, 1)
        noise = torch.randn_like(x_0, device=self.device)
        x_t = torch.sqrt(alpha_bar) * x_0 + torch.sqrt(1 - alpha_bar) * noise
        return x_t, noise

    def denoise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        T = self.num_timesteps
        assert (t >= 1).all() and (t <= T).all()
        t_idx = t - 1
        alpha = self.alphas[t_idx]
        alpha_bar = self.alpha_bars[t_idx]
        alpha_bar_prev = self.alpha_bars[t_idx - 1]
        N = alpha.size(0)
        alpha = alpha.view(N, 1, 1, 1)
        alpha_bar = alpha_bar.view(N, 1, 1, 1)
        alpha_bar_prev = alpha_bar_prev.view(N, 1, 1, 1)

        model.eval()  # the book switches modes around every reverse step
        with torch.no_grad():
            eps = model(x, t)
        model.train()

        noise = torch.randn_like(x, device=self.device)
        noise[t == 1] = 0  # no noise at the last step

        mu = (x - ((1 - alpha) / torch.sqrt(1 - alpha_bar)) * eps) / torch.sqrt(alpha)
        std = torch.sqrt((1 - alpha) * (1 - alpha_bar_prev) / (1 - alpha_bar))
        return mu + noise * std

    def reverse_to_img(self, x: torch.Tensor) -> np.ndarray:
        x = x * 255
        x = x.clamp(0, 255)
        x = x.to(torch.uint8)
        return x.cpu().numpy()[0]  # (28, 28); the book returns a PIL image here

    def sample(self, model: nn.Module, x_shape: tuple[int, ...] = (20, 1, 28, 28), num_steps: int | None = None):
        """The book's sampler; `num_steps` < T stops early (the benchmark times a prefix)."""
        batch_size = x_shape[0]
        x = torch.randn(x_shape, device=self.device)
        last = 0 if num_steps is None else max(0, self.num_timesteps - num_steps)
        for i in range(self.num_timesteps, last, -1):
            t = torch.tensor([i] * batch_size, device=self.device, dtype=torch.long)
            x = self.denoise(model, x, t)
        return [self.reverse_to_img(x[i]) for i in range(batch_size)]


# -- data and training (the book's loop) -------------------------------------------------------------
class PerImageDataset(torch.utils.data.Dataset):
    """uint8 (N, 28, 28) or (N, 1, 28, 28) images served one at a time through PIL + ToTensor, like
    torchvision's MNIST dataset with `transform=ToTensor()` (pixels in [0, 1])."""

    def __init__(self, images: torch.Tensor):
        from torchvision import transforms
        self.images = (images[:, 0] if images.dim() == 4 else images).numpy()  # the book's grayscale (N, 28, 28)
        self.transform = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), 0  # uint8 (28, 28) -> mode "L"


def make_dataloader(images: torch.Tensor, batch_size: int = 128) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PerImageDataset(images), batch_size=batch_size, shuffle=True)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, diffuser: Diffuser,
               images: torch.Tensor) -> float:
    """The body of the book's training loop for one batch (loss.item() every step, as the book does)."""
    optimizer.zero_grad()
    x = images.to(diffuser.device)
    t = torch.randint(1, diffuser.num_timesteps + 1, (len(x),), device=diffuser.device)
    x_noisy, noise = diffuser.add_noise(x, t)
    noise_pred = model(x_noisy, t)
    loss = F.mse_loss(noise, noise_pred)
    loss.backward()
    optimizer.step()
    return loss.item()
