"""The Train form's presets and the mapping between its fields and a `RunConfig` (no UI here).

A preset fills every form field; fields the form does not show (attention, warm-up, pixel range,
gradient clipping...) come from the preset's config, so "Improved (blog)" trains exactly the
core preset even though the form shows only the settings people change most.
"""
from __future__ import annotations

import time
from typing import Any

from core.config import PRESETS, ModelConfig, RunConfig, ScheduleConfig, TrainConfig, override

# The smallest run that exercises the whole pipeline in seconds: for trying the UI and for tests.
TINY = RunConfig(
    model=ModelConfig(name="improved_unet", base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                      attention=False, norm="group"),
    schedule=ScheduleConfig(timesteps=20, schedule="linear"),
    train=TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.01, batch_size=32, epochs=3, max_steps=48,
                      limit_images=512, pixel_range="symmetric", device="cpu", log_every=2,
                      sample_every_epochs=1, grid_steps=20, channels_last=False, checkpoint_every_s=0.0),
)

FORM_PRESETS: dict[str, RunConfig] = {
    "Book": PRESETS["book"],
    "Improved (blog)": PRESETS["improved"],
    "Quick CPU demo": PRESETS["quick"],
    "Tiny smoke test": TINY,
}
DEFAULT_PRESET = "Quick CPU demo"
PRESET_SLUGS = {"Book": "book", "Improved (blog)": "improved", "Quick CPU demo": "quick",
                "Tiny smoke test": "tiny"}

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
