"""ImprovedUNet: the blog's upgrade of the book's UNet, done the way DDPM / improved-DDPM do it.

- Time: sinusoidal encoding -> one shared MLP (Linear–SiLU–Linear) -> a projection in every block.
- Residual blocks: Norm–SiLU–Conv, + time projection, Norm–SiLU–Dropout–Conv, with the last
  convolution of each residual branch zero-initialised so every block starts as the identity
  (Goyal et al. 2017; used by Ho et al. 2020 and Nichol & Dhariwal 2021): training starts stable.
- Normalisation in every block: GroupNorm by default (independent of batch size, identical in
  training and sampling), BatchNorm selectable as in the blog.
- Multi-scale: one level per channel multiplier (28, 14, 7), skip connections at every block,
  optional self-attention at the lowest resolution.
- Conditional (`num_classes > 0`): a label embedding is added to the output of the shared time MLP
  (as guided-diffusion does), so every block sees it through its time projection. Row `num_classes`
  is a learned "no label" token: the unconditional branch of classifier-free guidance is a label of
  its own rather than a zero vector, so it can learn what "any class" looks like.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .embedding import NO_LABEL, sinusoidal_encoding


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    groups = 8 if channels % 8 == 0 else 4 if channels % 4 == 0 else 1
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, norm: str, dropout: float):
        super().__init__()
        self.norm1 = make_norm(norm, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = make_norm(norm, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(temb)[:, :, None, None]  # (B, C_out, 1, 1) per-channel shift
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head spatial self-attention over H×W positions, residual, zero-initialised output."""

    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.norm = make_norm(norm, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]      # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ImprovedUNet(nn.Module):
    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 attention: bool = True, norm: str = "group", dropout: float = 0.0, num_classes: int = 0):
        super().__init__()
        self.base_channels = base_channels
        time_dim = base_channels * 4
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.in_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        widths = [base_channels * m for m in channel_mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_widths, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, width, time_dim, norm, dropout))
                ch = width
                skip_widths.append(ch)
            self.down.append(blocks)
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skip_widths.append(ch)

        self.mid1 = ResBlock(ch, ch, time_dim, norm, dropout)
        self.mid_attn = SelfAttention(ch, norm) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, time_dim, norm, dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_widths.pop(), width, time_dim, norm, dropout))
                ch = width
            self.up.append(blocks)
            self.upsample.append(nn.Identity() if level == 0 else
                                 nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                               nn.Conv2d(ch, ch, 3, padding=1)))
        self.out_norm = make_norm(norm, ch)
        self.out_conv = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.num_classes = num_classes
        if num_classes:  # created last: unconditional models keep their state_dict keys and init
            self.label_emb = nn.Embedding(num_classes + 1, time_dim)  # row num_classes = "no label"

    def label_embedding(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) labels in 0..K-1 or NO_LABEL (None: all NO_LABEL) -> (B, 4C), NO_LABEL -> the null token."""
        if labels is None:
            labels = torch.full((batch,), NO_LABEL, dtype=torch.long, device=device)
        return self.label_emb(torch.where(labels == NO_LABEL, self.num_classes, labels))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time_mlp(sinusoidal_encoding(timesteps, self.base_channels))  # (B, 4C)
        if self.num_classes:
            temb = temb + self.label_embedding(labels, len(x), x.device)         # label (or null) token
        h = self.in_conv(x)                                                      # (B, C, 28, 28)
        skips = [h]
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, temb)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)                                                      # halve H, W
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)                   # lowest resolution
        for blocks, up in zip(self.up, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            h = up(h)                                                            # double H, W
        return self.out_conv(F.silu(self.out_norm(h)))                           # (B, 1, 28, 28)
