"""The Train form's presets and the mapping between its fields and a `RunConfig` (no UI here).

A preset fills every form field; fields the form does not show (attention, warm-up, pixel range,
gradient clipping...) come from the preset's config, so "Improved (blog)" trains exactly the
core preset even though the form shows only the settings people change most.
"""
from __future__ import annotations

import time
from typing import Any

from core.config import DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS, PRESETS, RunConfig, flat_value, override

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

# The form's fields, by the flat names `core.config.override` routes to their config sections (it
# owns that mapping). The widget key is "f_" + the name. The data source (dataset, folder, size, channels,
# flip) is not here: presets leave it as the user set it (dashboard.data_source).
FORM_FIELDS: tuple[str, ...] = (
    "model", "base_channels", "optimizer", "lr", "weight_decay", "batch_size", "epochs", "max_steps",
    "time_budget_s", "limit_images", "timesteps", "schedule", "seed", "device", "ema_decay",
    "num_classes", "label_dropout", "label_dropout_mode",        # step 10: 0 = unconditional, 10 = labels
    # The "Advanced" section: what the presets set and the main form hides.
    "attention", "scale_to_timesteps", "pixel_range", "warmup_steps", "grad_clip", "clip_denoised",
    "grid_sampler", "grid_steps",
    "prediction",      # the training objective: ε (the book) or v
    "min_snr_gamma",   # Min-SNR-γ loss weights; 0 = the book's plain MSE
)
# Fields a network ignores: the form hides them for that model, the tables show them as "not used".
UNUSED_MODEL_FIELDS = {"unet": ("channel_mults", "num_res_blocks", "attention", "norm", "dropout"),
                       "improved_unet": ()}
# Measured: `python -m core train --preset tiny` took 28 s (wall, with start-up) on a quiet 2-core
# machine with one thread, 63-100 s from the dashboard on a busy one.
TINY_TAKES = "about half a minute on a quiet 2-core CPU, 1–2 minutes on a busy one (28 s and 63–100 s measured)"


def form_values(config: RunConfig) -> dict[str, Any]:
    """The form's field values for `config`; the preview grids use the best few-step sampler."""
    values = {name: flat_value(config, name) for name in FORM_FIELDS}
    values["grid_sampler"] = DEFAULT_FEW_STEP_SAMPLER
    values["grid_steps"] = min(DEFAULT_FEW_STEPS, config.schedule.timesteps)
    return values


def config_from_form(preset_name: str, values: dict[str, Any]) -> RunConfig:
    """The preset's config with the form's values on top; raises ConfigError for bad values."""
    changes = {name: values[name] for name in FORM_FIELDS if name in values}
    return override(FORM_PRESETS[preset_name], **changes)


def default_run_name(preset_name: str, model: str, optimizer: str, now: float | None = None) -> str:
    """e.g. quick-improved_unet-adamw-20250101-120000: readable, sortable, a valid folder name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{PRESET_SLUGS.get(preset_name, 'run')}-{model}-{optimizer}-{stamp}"
