"""Class-conditional sampling and classifier-free guidance (Ho & Salimans 2022; the book's step 10).

A conditional network predicts ε̂(x_t, t, y) for a label y and ε̂(x_t, t, ∅) without one (the
same weights, trained with labels dropped). Guidance extrapolates from the second to the first:

    ε̃ = ε̂(x_t, t, ∅) + γ · (ε̂(x_t, t, y) − ε̂(x_t, t, ∅))

γ = 0 is the unconditional model, γ = 1 the plain conditional one, γ > 1 trades diversity for
fidelity (the book uses γ = 3). `guided` wraps a network into a Denoiser `(x_t, t) -> ε̃`, so every
sampler of `core.sampling` runs guided without knowing it. For γ ∉ {0, 1} the two predictions come
from ONE forward pass over the batch stacked twice, [x; x] with labels [y; ∅]: one pass over 2B
images keeps the convolutions busy where two passes over B would each run below the machine's
rate, and a GPU does both halves in the time of one (the bench measures it).

Also here: turning what a user typed (`7`, `Sneaker`) into a class index, and the label layouts
of a grid with one row per class and of an evaluation spread evenly over the classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..config import ConfigError, DataConfig, RunConfig
from ..data.datasets import CLASS_NAMES
from ..models import NO_LABEL

# Same shape as core.sampling.Denoiser (sampling imports this module, not the other way round).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BOOK_GUIDANCE = 3.0
MAX_GUIDANCE = 100.0  # far beyond any useful γ; guards against a typo that would only give noise


def check_guidance(scale: float) -> float:
    """A guidance scale γ: finite and at least 0. One message for the CLI and the dashboard."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale < 0 or scale > MAX_GUIDANCE:
        raise ConfigError(f"guidance = {scale!r} is not allowed: it must be a finite number from 0 to "
                          f"{MAX_GUIDANCE:g} (0 unconditional, 1 conditional, > 1 guided; the book uses 3)")
    return float(scale)


def guided(model: nn.Module | Callable, labels: torch.Tensor, scale: float) -> Denoiser:
    """The Denoiser `(x_t, t) -> ε̃` of `model` guided towards `labels` (B,) at scale γ.

    γ = 0 and γ = 1 need one prediction only, so they cost one plain pass; any other γ stacks the
    conditional and unconditional halves into one batch of 2B.
    """
    scale = check_guidance(scale)
    labels = labels.long()
    no_label = torch.full_like(labels, NO_LABEL)
    if scale == 0.0:
        return lambda x_t, t: model(x_t, t, no_label)
    if scale == 1.0:
        return lambda x_t, t: model(x_t, t, labels)
    both_labels = torch.cat([labels, no_label])  # (2B,): [y; ∅]

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both_labels)   # (2B, 1, 28, 28)
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return denoise


def guided_nfe(scale: float) -> int:
    """Network evaluations per image and step: two for guidance proper, one for γ = 0 or 1."""
    return 1 if scale in (0.0, 1.0) else 2


# -- what a user asks for ------------------------------------------------------------------------------
def class_names(data: DataConfig | str) -> tuple[str, ...]:
    """The run's class names: a built-in dataset's, or its folder's subfolders (`config.data`)."""
    return data.names if isinstance(data, DataConfig) else CLASS_NAMES[data]


def class_index(value: int | str, dataset: str) -> int:
    """'7', 7 or 'Sneaker' (any case) -> 7 for FashionMNIST; anything else is one clear message."""
    names = class_names(dataset)
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(names):
            return index
    else:
        lowered = {name.lower(): i for i, name in enumerate(names)}
        if text.lower() in lowered:
            return lowered[text.lower()]
    choices = ", ".join(f"{i} {name}" for i, name in enumerate(names))
    raise ConfigError(f"class = {value!r} is not allowed: choose 0..{len(names) - 1} or a name ({choices})")


def check_conditional(config: RunConfig, run_name: str, what: str = "class") -> None:
    """Refuse class labels or guidance for a run whose network never saw a label."""
    if not config.model.conditional:
        raise ConfigError(f"{what} is not allowed for run {run_name!r}: it is unconditional (num_classes = 0); "
                          "train a conditional run (--conditional or --preset improved-cfg) to pick classes")


def default_guidance(config: RunConfig) -> float:
    """The book's γ = 3 for a run trained with label dropout; γ = 1 for one that never learned ∅."""
    return BOOK_GUIDANCE if config.train.label_dropout > 0 else 1.0


@dataclass(frozen=True)
class Conditioning:
    """What to sample from a conditional run: one label per image (None: unconditional run), γ,
    the number of images, and the grid's columns (one row per class) when there is one."""
    labels: torch.Tensor | None
    guidance: float
    n: int
    ncol: int | None


def describe_labels(labels: torch.Tensor, dataset: str) -> str:
    """'class Sneaker' or '10 classes' for messages and captions."""
    present = sorted(set(labels.tolist()))
    names = class_names(dataset)
    return f"class {names[present[0]]}" if len(present) == 1 else f"{len(present)} classes"


def per_class_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """Labels of a grid with one row per class: [c0]*per_class + [c1]*per_class + ..."""
    return torch.tensor(list(classes), dtype=torch.long).repeat_interleave(per_class)


def even_labels(n: int, num_classes: int) -> torch.Tensor:
    """n labels spread evenly over the classes (0, 1, ..., K-1, 0, 1, ...): N/K of each."""
    return torch.arange(n, dtype=torch.long) % num_classes
