"""The Train form's presets and the mapping between its fields and a `RunConfig` (no UI here).

A preset fills every form field; fields the form does not show (attention, warm-up, pixel range,
gradient clipping...) come from the preset's config, so "Improved (blog)" trains exactly the
core preset even though the form shows only the settings people change most.
"""
from __future__ import annotations

import time
from typing import Any

from core.config import PRESETS, RunConfig, override

FORM_PRESETS: dict[str, RunConfig] = {
    "Book": PRESETS["book"],
    "Improved (blog)": PRESETS["improved"],
    "Quick CPU demo": PRESETS["quick"],
    "Tiny smoke test": PRESETS["tiny"],
    "Improved + guidance (step 10)": PRESETS["improved-cfg"],
    "Book conditional (step 10)": PRESETS["book-cond"],
    "Book + guidance (step 10)": PRESETS["book-cfg"],
}
DEFAULT_PRESET = "Quick CPU demo"
PRESET_SLUGS = {"Book": "book", "Improved (blog)": "improved", "Quick CPU demo": "quick",
                "Tiny smoke test": "tiny", "Improved + guidance (step 10)": "improved-cfg",
                "Book conditional (step 10)": "book-cond", "Book + guidance (step 10)": "book-cfg"}

# Form field -> (config section, config field). The widget key is "f_" + the form field.
FORM_FIELDS: dict[str, tuple[str, str]] = {
    "dataset": ("train", "dataset"),
    "model": ("model", "name"),
    "base_channels": ("model", "base_channels"),
    "optimizer": ("train", "optimizer"),
    "lr": ("train", "lr"),
    "weight_decay": ("train", "weight_decay"),
    "batch_size": ("train", "batch_size"),
    "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"),
    "time_budget_s": ("train", "time_budget_s"),
    "limit_images": ("train", "limit_images"),
    "timesteps": ("schedule", "timesteps"),
    "schedule": ("schedule", "schedule"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "ema_decay": ("train", "ema_decay"),
    "num_classes": ("model", "num_classes"),              # step 10: 0 = unconditional, 10 = labels
    "label_dropout": ("train", "label_dropout"),
    "label_dropout_mode": ("train", "label_dropout_mode"),
}


def form_values(config: RunConfig) -> dict[str, Any]:
    """The form's field values for `config`."""
    sections = {"model": config.model, "schedule": config.schedule, "train": config.train}
    return {name: getattr(sections[section], attr) for name, (section, attr) in FORM_FIELDS.items()}


def config_from_form(preset_name: str, values: dict[str, Any]) -> RunConfig:
    """The preset's config with the form's values on top; raises ConfigError for bad values."""
    changes = {attr: values[name] for name, (_, attr) in FORM_FIELDS.items() if name in values}
    return override(FORM_PRESETS[preset_name], **changes)


def default_run_name(preset_name: str, model: str, optimizer: str, now: float | None = None) -> str:
    """e.g. quick-improved_unet-adamw-20250101-120000: readable, sortable, a valid folder name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{PRESET_SLUGS.get(preset_name, 'run')}-{model}-{optimizer}-{stamp}"
