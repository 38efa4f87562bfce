"""Parameters and FLOPs per image of each preset's network, counted with torch.utils.flop_counter."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import PRESETS, ModelConfig
from ..models import build_model, count_parameters


def flops_per_image(model: nn.Module, train: bool, batch: int = 4,
                    shape: tuple[int, int, int] = (1, 28, 28)) -> float:
    """FLOPs of one forward (train=False) or forward + backward (train=True) pass, per image of `shape`."""
    x = torch.randn(batch, *shape)
    t = torch.randint(1, 1001, (batch,))
    was_training = model.training
    model.train(train)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x, t).sum().backward()
        else:
            with torch.no_grad():
                model(x, t)
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def model_cost(config: ModelConfig, image_size: int = 28) -> dict:
    """Parameters and GFLOPs per image of a network at `image_size` (its channels are the config's)."""
    model = build_model(config)
    shape = (config.in_channels, image_size, image_size)
    return {"model": config.name, "params": count_parameters(model),
            "forward_gflop": flops_per_image(model, False, shape=shape) / 1e9,
            "train_gflop": flops_per_image(model, True, shape=shape) / 1e9}


def model_costs() -> list[dict]:
    rows = [dict(preset=name, **model_cost(cfg.model)) for name, cfg in PRESETS.items()]
    book = next(r for r in rows if r["preset"] == "book")["train_gflop"]
    for r in rows:
        r["train_vs_book"] = r["train_gflop"] / book
    return rows
