"""Denoising networks. Every model is called as `model(x, t) -> predicted noise`, t in 1..T;
conditional ones (`num_classes > 0`) also as `model(x, t, labels)`, labels in 0..K-1 or NO_LABEL."""
from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .embedding import NO_LABEL
from .improved_unet import ImprovedUNet
from .unet import UNet

__all__ = ["NO_LABEL", "ImprovedUNet", "UNet", "build_model", "count_parameters"]


def build_model(config: ModelConfig) -> nn.Module:
    """Rebuild a network from its config alone (what a run folder stores)."""
    if config.name == "unet":
        return UNet(config.in_channels, config.out_channels, config.time_embed_dim, config.base_channels,
                    config.num_classes)
    return ImprovedUNet(config.in_channels, config.out_channels, config.base_channels,
                        config.channel_mults, config.num_res_blocks, config.attention,
                        config.norm, config.dropout, config.num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
