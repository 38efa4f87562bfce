"""Memory budget: refuse, before allocating anything, a network or a batch this machine cannot hold.

A config (typed, or edited into a shared run's config.json) can ask for a network of 86 G
parameters or a batch of 60,000 images: allocating them first would take the process (or the
machine) down. So the parameters are counted on PyTorch's `meta` device (shapes only, no memory),
and the activations per image are estimated from one forward pass on `meta` that sums the outputs
of the leaf modules, times a factor measured once:

    peak RSS of two training steps (CPU, float32, channels_last), batch 320 minus batch 64, / 256:
      book UNet       4.37 MB/image  (leaf outputs 4.60 MB/image: ratio 0.95)
      ImprovedUNet    6.21 MB/image  (leaf outputs 4.37 MB/image: ratio 1.42; attention, GroupNorm
                                      and SiLU keep tensors that no leaf module returns)
    ACTIVATION_FACTOR = 1.45, the larger ratio rounded up: an estimate that errs on the safe side.

Training needs the weights, their gradients, Adam's two moments and the EMA copy (about 24 bytes a
parameter with the checkpoint's copy) plus the batch's activations; sampling needs the weights
and about half the training activations per image (no gradients are kept, but the UNet's skips are).
"""
from __future__ import annotations

import functools

import torch

from ..device import available_host_memory
from ..config import ConfigError, ModelConfig, RunConfig
from . import build_model

MAX_PARAMETERS = 500_000_000   # 2 GB of float32 weights: 200x the book's UNet, a hard cap on any machine
ACTIVATION_FACTOR = 1.45
TRAIN_BYTES_PER_PARAMETER = 24  # weights 4 + gradients 4 + Adam moments 8 + EMA 4 + checkpoint copy 4
SAMPLE_BYTES_PER_PARAMETER = 4
DATASET_IMAGES = 60_000          # the training split held as uint8 on the training device (FashionMNIST's size)
DATASET_BYTES = DATASET_IMAGES * 28 * 28
USABLE_FRACTION = 0.9           # leave the rest to the OS, the dashboard and the allocator's slack


@functools.lru_cache(maxsize=64)
def _measure(model: ModelConfig, image_size: int = 28) -> tuple[int, int]:
    """(parameters, bytes of leaf-module outputs for one image of the run's size), on the meta device."""
    with torch.device("meta"):
        network = build_model(model)
    parameters = sum(p.numel() for p in network.parameters())
    if parameters > MAX_PARAMETERS:
        return parameters, 0  # refused anyway: skip the forward pass
    outputs = [0]

    def count(module, inputs, output) -> None:
        if torch.is_tensor(output):
            outputs[0] += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in network.modules() if not list(m.children())]
    try:
        with torch.device("meta"):
            network(torch.zeros(1, model.in_channels, image_size, image_size), torch.ones(1, dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    return parameters, outputs[0]


def parameter_count(model: ModelConfig) -> int:
    return _measure(model)[0]


def activation_bytes_per_image(model: ModelConfig, image_size: int = 28) -> int:
    """Estimated bytes of activations a training step keeps per image of `image_size` pixels square."""
    return int(_measure(model, image_size)[1] * ACTIVATION_FACTOR)


def available_bytes(device: torch.device) -> int:
    """Memory free for a new allocation on `device`: CUDA's free memory, or the host's (device.py)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_host_memory()


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _describe(model: ModelConfig) -> str:
    return (f"{model.name} with base_channels = {model.base_channels}, channel_mults = "
            f"{' '.join(map(str, model.channel_mults))}, num_res_blocks = {model.num_res_blocks}")


def check_parameters(model: ModelConfig) -> int:
    parameters = parameter_count(model)
    if parameters > MAX_PARAMETERS:
        raise ConfigError(f"model = {_describe(model)} is not allowed: it has {parameters:,} parameters, over the "
                          f"limit of {MAX_PARAMETERS:,}; lower base_channels, channel_mults or num_res_blocks")
    return parameters


def _check_fits(model: ModelConfig, batch: int, device: torch.device, per_parameter: int, act_share: float,
                fixed: int, what: str, batch_field: str, image_size: int = 28) -> None:
    parameters = check_parameters(model)
    per_image = int(activation_bytes_per_image(model, image_size) * act_share)
    weights = parameters * per_parameter + fixed
    need = weights + batch * per_image
    have = int(available_bytes(device) * USABLE_FRACTION)
    if need <= have:
        return
    if weights >= have:
        raise ConfigError(f"model = {_describe(model)} is not allowed: {what} it needs about {_gb(weights)} for "
                          f"{parameters:,} parameters, but {device} has {_gb(have)} to spare; make it smaller")
    fits = max(1, (have - weights) // max(per_image, 1))
    raise ConfigError(f"{batch_field} = {batch} is not allowed: {what} it needs about {_gb(need)} "
                      f"({_gb(batch * per_image)} of activations for {batch} images), but {device} has "
                      f"{_gb(have)} to spare; use {batch_field} {fits} or less")


def check_training_fits(config: RunConfig, device: torch.device) -> None:
    """Refuse (ConfigError, one line) a training run that cannot fit in `device`'s memory."""
    c, h, w = config.data.shape
    _check_fits(config.model, config.train.batch_size, device, TRAIN_BYTES_PER_PARAMETER, 1.0,
                DATASET_IMAGES * c * h * w, "to train,", "batch_size", image_size=h)


def check_sampling_fits(model: ModelConfig, batch: int, device: torch.device, image_size: int = 28) -> None:
    """Refuse a network (or a sampling batch) that cannot be held in `device`'s memory."""
    _check_fits(model, batch, device, SAMPLE_BYTES_PER_PARAMETER, 0.5, 0, "to sample,", "batch_size",
                image_size=image_size)
