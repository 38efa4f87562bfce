"""Frozen, validated configuration for models, noise schedules, training and sampling.

Every field is checked here and only here, so the CLI, the dashboard and the Python API
report the same message for the same mistake: the field, the value, and what is allowed.
A `RunConfig` round-trips through JSON and carries a `format_version`, so a run folder can
rebuild its model, schedule and optimizer from `config.json` alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import safejson

# 2: the linear schedule scales with T (`scale_to_timesteps`); format-1 files keep the unscaled one.
# 3: class-conditional runs (`model.num_classes`, `train.label_dropout*`); formats 1 and 2 read as
#    unconditional runs. An older reader refuses the new fields, so a format-3 folder says so first.
# 4: the training objective (`train.prediction`, `train.min_snr_gamma`); formats 1-3 read as the
#    book's ε-prediction with the plain MSE.
# 5: the data section (`data.dataset`, image size, channels, the folder and its fingerprint); formats
#    1-4 read as today: their `train.dataset` moves to `data.dataset`, 28x28, one channel.
FORMAT_VERSION = 5

MODEL_NAMES = ("unet", "improved_unet")
NORM_NAMES = ("group", "batch")
SCHEDULE_NAMES = ("linear", "cosine")
OPTIMIZER_NAMES = ("adam", "adamw")
DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "folder")
BUILTIN_DATASETS = ("fashion_mnist", "mnist", "cifar10")
# (channels, size) of each built-in dataset as stored; a run may ask for another size or channel count.
BUILTIN_SHAPES = {"fashion_mnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32)}
BUILTIN_CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
# 16 to 64 pixels, a multiple of 4: the book's UNet halves twice, and beyond 64 a CPU cannot train.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 64
CHANNEL_COUNTS = (1, 3)
FOLDER_SIZE_DEFAULT = 32
MAX_CLASS_NAME = 100
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp2m", "dpmpp2m-sde")
SPACING_NAMES = ("uniform", "logsnr")   # sampler timesteps: even in t, or even in log-SNR λ
CLIP_NAMES = ("auto", "on", "off")       # x̂0 clipping: auto = the run's default for DDPM, on for the rest
PIXEL_RANGES = ("unit", "symmetric")  # [0, 1] as in the book, or [-1, 1]
# Classifier-free guidance drops labels while training: per sample (the default, every batch mixes
# both tasks) or, as the book's step 10 does, the whole batch at once.
LABEL_DROPOUT_MODES = ("sample", "batch")
# What the network predicts: the noise ε (the book) or the velocity v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0
# (Salimans & Ho 2022). Samplers convert either to ε̂ in one place (NoiseScheduler.pred_eps).
PREDICTION_NAMES = ("eps", "v")
MAX_MIN_SNR_GAMMA = 1000.0
MAX_CLASSES = 1000

RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,80}$")
MAX_SAMPLES = 10_000  # more than this is almost surely a typo, and would take hours on a CPU

# Display names, one place for the CLI, the reports and every dashboard page.
MODEL_LABELS = {"unet": "UNet", "improved_unet": "ImprovedUNet"}
OPTIMIZER_LABELS = {"adam": "Adam", "adamw": "AdamW"}
DATASET_LABELS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "folder": "image folder"}
SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)",
                  "dpmpp2m-sde": "DPM-Solver++(2M) SDE"}
PIXEL_RANGE_LABELS = {"unit": "[0, 1]", "symmetric": "[-1, 1]"}
PREDICTION_LABELS = {"eps": "ε", "v": "v"}
# The few-step setting used wherever a cheap sample is wanted (per-epoch previews, the dashboard's
# defaults). Chosen from the step sweep on the improved demo run (docs/results.md): at 20 steps the
# stochastic DPM-Solver++(2M) scores far closer to DDPM-1000 than the ODE solvers at any step count.
DEFAULT_FEW_STEP_SAMPLER = "dpmpp2m-sde"
DEFAULT_FEW_STEPS = 20


class ConfigError(ValueError):
    """A configuration value is not allowed. The message names the field, the value and the rule."""


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: an error line names a 10,000-entry list, it does not print it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name} = {short_repr(value)} is not allowed: {allowed}")


def _check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field_name, value, "choose one of " + ", ".join(choices))


def _check_int(field_name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field_name, value, "it must be a whole number")
    if low is not None and value < low:
        _fail(field_name, value, f"it must be at least {low}")
    if high is not None and value > high:
        _fail(field_name, value, f"it must be at most {high}")


def _check_float(field_name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field_name, value, "it must be a finite number")
    if low is not None:
        if low_inclusive and value < low:
            _fail(field_name, value, f"it must be at least {low}")
        if not low_inclusive and value <= low:
            _fail(field_name, value, f"it must be greater than {low}")
    if high is not None and value > high:
        _fail(field_name, value, f"it must be at most {high}")


def check_run_name(name: str) -> str:
    """A run name becomes a folder name, so it may not climb out of the runs folder."""
    # fullmatch, not match: '$' also matches before a trailing newline, which would let "x\n" through.
    if not isinstance(name, str) or not RUN_NAME_PATTERN.fullmatch(name) or name in (".", "..") \
            or name.startswith("."):
        _fail("name", name, "use 1 to 80 characters from A-Z a-z 0-9 . _ - (no '/', no '..', "
              "not starting with '.')")
    return name


@dataclass(frozen=True)
class ModelConfig:
    """Which network and how wide. Fields a model does not use are ignored by it."""
    name: str = "unet"
    base_channels: int = 64            # the book's first level width
    channel_mults: tuple[int, ...] = (1, 2)  # improved_unet: one entry per resolution
    num_res_blocks: int = 1            # improved_unet: residual blocks per level
    attention: bool = True             # improved_unet: self-attention at the lowest resolution
    norm: str = "group"                # improved_unet: GroupNorm (default) or BatchNorm (the blog)
    dropout: float = 0.0
    time_embed_dim: int = 100          # the book's sinusoidal encoding size D
    in_channels: int = 1
    out_channels: int = 1
    num_classes: int = 0               # 0 = unconditional (step 9); 10 = a label embedding (step 10)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def __post_init__(self) -> None:
        if not isinstance(self.channel_mults, (list, tuple)):
            _fail("channel_mults", self.channel_mults, "give a list of whole numbers, like 1 2 2")
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        _check_choice("model", self.name, MODEL_NAMES)
        _check_int("base_channels", self.base_channels, 4, 512)
        if not self.channel_mults or len(self.channel_mults) > 3:
            _fail("channel_mults", self.channel_mults,
                  "give 1 to 3 multipliers (28x28 images allow at most two halvings: 28, 14, 7)")
        for m in self.channel_mults:
            _check_int("channel_mults", m, 1, 16)
        _check_int("num_res_blocks", self.num_res_blocks, 1, 8)
        if not isinstance(self.attention, bool):
            _fail("attention", self.attention, "it must be true or false")
        _check_choice("norm", self.norm, NORM_NAMES)
        _check_float("dropout", self.dropout, 0.0, 0.9)
        _check_int("time_embed_dim", self.time_embed_dim, 2, 4096)
        if self.time_embed_dim % 2:
            _fail("time_embed_dim", self.time_embed_dim, "it must be even (sin and cos pairs)")
        # The network sees the data's channels (RunConfig checks they agree with `data.channels`).
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) not in CHANNEL_COUNTS:
                _fail(name, getattr(self, name), "use 1 (grayscale) or 3 (colour)")
        _check_int("num_classes", self.num_classes, 0, MAX_CLASSES)
        if self.num_classes == 1:
            _fail("num_classes", self.num_classes, "use 0 (unconditional) or the number of classes, e.g. 10")
        if self.name == "improved_unet" and self.norm == "group" and self.base_channels % 4:
            _fail("base_channels", self.base_channels, "GroupNorm needs a multiple of 4")


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward process: T steps and how beta_t grows.

    beta_start / beta_end are the book's values for T = 1000. With `scale_to_timesteps` (the default)
    a linear schedule of another T scales both by 1000/T (improved-diffusion), so x_T is noise for
    any T; at T = 1000 the betas are exactly the book's.
    """
    timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    scale_to_timesteps: bool = True

    def __post_init__(self) -> None:
        _check_int("timesteps", self.timesteps, 2, 10_000)
        _check_choice("schedule", self.schedule, SCHEDULE_NAMES)
        if not isinstance(self.scale_to_timesteps, bool):
            _fail("scale_to_timesteps", self.scale_to_timesteps, "it must be true or false")
        _check_float("beta_start", self.beta_start, 0.0, 0.999, low_inclusive=False)
        _check_float("beta_end", self.beta_end, 0.0, 0.999, low_inclusive=False)
        if self.beta_end < self.beta_start:
            _fail("beta_end", self.beta_end, f"it must be at least beta_start ({self.beta_start})")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: optimizer, length, and the safety nets (what it trains on is `DataConfig`)."""
    pixel_range: str = "unit"
    optimizer: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    max_steps: int = 0                 # 0 = no limit; the run ends at whichever limit comes first
    time_budget_s: float = 0.0         # 0 = no limit; wall-clock seconds of training
    warmup_steps: int = 0
    seed: int = 0
    device: str = "auto"
    ema_decay: float = 0.0             # 0 = no EMA
    grad_clip: float = 0.0             # 0 = no clipping
    limit_images: int = 0              # 0 = the whole training split; else the first N images
    checkpoint_every_s: float = 120.0  # periodic checkpoints, besides epoch ends and stop
    log_every: int = 10                # steps between metrics.csv rows
    sample_every_epochs: int = 1       # 0 = no per-epoch grids
    grid_sampler: str = DEFAULT_FEW_STEP_SAMPLER  # per-epoch grids are previews: a few-step sampler
    grid_steps: int = DEFAULT_FEW_STEPS
    clip_denoised: bool = False        # sampling default of this run: DDPM clips x̂0 to the data range
    # channels_last pays for training on CPU and GPU, torch.compile did not on the CPU: the bench
    # (`python -m core bench`) measures both, the README quotes the figures.
    channels_last: bool = True
    compile: bool = False
    # Conditional runs only: the share of labels dropped for classifier-free guidance (the book: 0.1,
    # per batch); 0 trains a purely conditional model (the book's UNetCond).
    label_dropout: float = 0.1
    label_dropout_mode: str = "sample"
    # The training objective, both ablations of the book's (ε-prediction, plain MSE), for either network:
    # `prediction` "v" regresses the velocity v (Salimans & Ho 2022, "Progressive Distillation");
    # `min_snr_gamma` γ > 0 weights each sample's MSE by min(SNR_t, γ) over its target's SNR factor
    # (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"); 0 = off.
    prediction: str = "eps"
    min_snr_gamma: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (list, tuple)):
            _fail("betas", self.betas, "give two numbers, like 0.9 0.999")
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_choice("pixel_range", self.pixel_range, PIXEL_RANGES)
        _check_choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _check_float("lr", self.lr, 0.0, 1.0, low_inclusive=False)
        if len(self.betas) != 2:
            _fail("betas", self.betas, "give two numbers, like 0.9 0.999")
        for b in self.betas:
            _check_float("betas", b, 0.0, 0.9999)
        _check_float("weight_decay", self.weight_decay, 0.0, 10.0)
        _check_int("batch_size", self.batch_size, 1, 60_000)
        _check_int("epochs", self.epochs, 0, 100_000)
        _check_int("max_steps", self.max_steps, 0)
        _check_float("time_budget_s", self.time_budget_s, 0.0)
        if self.epochs == 0 and self.max_steps == 0 and self.time_budget_s == 0:
            _fail("epochs", self.epochs, "with max_steps = 0 and no time budget the run would never "
                  "train; set epochs or max_steps above 0")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_choice("device", self.device, DEVICE_NAMES)
        _check_float("ema_decay", self.ema_decay, 0.0, 0.99999)
        _check_float("grad_clip", self.grad_clip, 0.0)
        _check_int("limit_images", self.limit_images, 0)
        if self.limit_images and self.batch_size > self.limit_images:
            _fail("batch_size", self.batch_size,
                  f"it must not exceed the {self.limit_images} images in use (limit_images)")
        _check_float("checkpoint_every_s", self.checkpoint_every_s, 0.0)
        _check_int("log_every", self.log_every, 1)
        _check_int("sample_every_epochs", self.sample_every_epochs, 0)
        _check_choice("grid_sampler", self.grid_sampler, SAMPLER_NAMES)
        _check_int("grid_steps", self.grid_steps, 1)
        _check_float("label_dropout", self.label_dropout, 0.0)
        if self.label_dropout >= 1.0:
            _fail("label_dropout", self.label_dropout, "it must be at least 0 and below 1 (1 would never "
                  "show the network a label)")
        _check_choice("label_dropout_mode", self.label_dropout_mode, LABEL_DROPOUT_MODES)
        _check_choice("prediction", self.prediction, PREDICTION_NAMES)
        _check_float("min_snr_gamma", self.min_snr_gamma, 0.0, MAX_MIN_SNR_GAMMA)
        for flag in ("channels_last", "compile", "clip_denoised"):
            if not isinstance(getattr(self, flag), bool):
                _fail(flag, getattr(self, flag), "it must be true or false")


@dataclass(frozen=True)
class SampleConfig:
    """How to generate: which reverse process, how many steps, how many images."""
    sampler: str = "ddpm"
    steps: int = 0        # 0 = T (every step); the others may take fewer
    eta: float = 0.0      # DDIM stochasticity: 0 deterministic, 1 ~ DDPM
    n: int = 16
    seed: int = 0
    batch_size: int = 256
    spacing: str = "uniform"         # timesteps of the few-step samplers: even in t or in log-SNR
    clip: str = "auto"               # x̂0 clipped to the data range: auto, on, off
    # DPM-Solver++: kept so saved requests still load. The final step into t = 0 is always first order
    # (σ_0 = 0 leaves no second-order term), as in diffusers and DPM-Solver; no other step is lowered.
    lower_order_final: bool = True

    def __post_init__(self) -> None:
        _check_choice("sampler", self.sampler, SAMPLER_NAMES)
        _check_int("steps", self.steps, 0)
        _check_float("eta", self.eta, 0.0, 1.0)
        _check_choice("spacing", self.spacing, SPACING_NAMES)
        _check_choice("clip", self.clip, CLIP_NAMES)
        if not isinstance(self.lower_order_final, bool):
            _fail("lower_order_final", self.lower_order_final, "it must be true or false")
        _check_int("n", self.n, 1, MAX_SAMPLES)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("batch_size", self.batch_size, 1, 10_000)

    def resolved_steps(self, timesteps: int) -> int:
        """The number of reverse steps for a schedule of `timesteps`; checks the upper bound."""
        steps = self.steps or timesteps
        if steps < 1 or steps > timesteps:
            _fail("steps", self.steps, f"it must be between 1 and T = {timesteps}")
        if self.sampler == "ddpm" and steps != timesteps:
            _fail("steps", self.steps, f"DDPM runs every step (T = {timesteps}); use ddim or dpmpp2m "
                  "for fewer steps")
        return steps

    def resolved_clip(self, run_default: bool) -> bool:
        """Whether x̂0 is clipped: `auto` is the run's own default for DDPM (off for the book, so
        step 9 stays exact) and on for the few-step samplers, which run away without it."""
        if self.clip == "auto":
            return run_default if self.sampler == "ddpm" else True
        return self.clip == "on"

    @property
    def setting(self) -> str:
        """A short name for this sampler setting, e.g. `ddim-50` or `dpmpp2m-sde-20-logsnr`."""
        parts = [self.sampler, str(self.steps or "T")]
        if self.sampler == "ddim" and self.eta:
            parts.append(f"eta{self.eta:g}")
        if self.spacing != "uniform" and self.sampler != "ddpm":
            parts.append(self.spacing)
        if self.clip != "auto":
            parts.append(f"clip-{self.clip}")
        return "-".join(parts)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DataConfig:
    """What the run trains on, complete enough to rebuild it anywhere.

    `dataset` is a built-in source (fashion_mnist, mnist, cifar10) or `folder`: images under `data_dir`
    (the ImageFolder convention: two or more subfolders are classes, a flat folder is unlabelled).
    Every image is resized (shorter side) and centre-cropped to `image_size` and converted to `channels`.
    For a folder, `fingerprint` (sha256 of the files' paths, sizes and mtimes) and `class_names` record
    what the run saw, so a resume can tell that the folder changed and a run folder names its classes
    without the images. `hflip` mirrors half of each batch at random while training.
    """
    dataset: str = "fashion_mnist"
    data_dir: str = ""                       # folder only: where the images are
    image_size: int = 28
    channels: int = 1
    hflip: bool = False
    fingerprint: str = ""                    # folder only: sha256 hex of (path, size, mtime) of every file
    class_names: tuple[str, ...] = ()        # folder only: subfolder names in sorted order; () = unlabelled

    def __post_init__(self) -> None:
        if not isinstance(self.class_names, (list, tuple)):
            _fail("class_names", self.class_names, "give a list of names")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        _check_choice("dataset", self.dataset, DATASET_NAMES)
        _check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        if self.image_size % 4:
            _fail("image_size", self.image_size, f"use a multiple of 4 from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} "
                  "(the networks halve the image twice)")
        if isinstance(self.channels, bool) or self.channels not in CHANNEL_COUNTS:
            _fail("channels", self.channels, "use 1 (grayscale) or 3 (colour)")
        if not isinstance(self.hflip, bool):
            _fail("hflip", self.hflip, "it must be true or false")
        if not isinstance(self.data_dir, str) or len(self.data_dir) > 4096 or "\x00" in self.data_dir:
            _fail("data_dir", self.data_dir, "give a folder path as text (at most 4096 characters)")
        if not isinstance(self.fingerprint, str) or (self.fingerprint and not _HEX64.fullmatch(self.fingerprint)):
            _fail("fingerprint", self.fingerprint, "it must be empty or 64 lowercase hex digits (sha256)")
        if self.dataset == "folder":
            if not self.data_dir:
                _fail("data_dir", self.data_dir, "--dataset folder needs --data-dir PATH, the folder of images")
            self._check_class_names()
        elif self.data_dir or self.fingerprint or self.class_names:
            _fail("data_dir", self.data_dir, f"data_dir, fingerprint and class_names belong to --dataset folder, "
                  f"not {self.dataset}")

    def _check_class_names(self) -> None:
        names = self.class_names
        if len(names) == 1 or len(names) > MAX_CLASSES:
            _fail("class_names", f"{len(names)} names", f"give none (unlabelled) or 2 to {MAX_CLASSES}")
        for name in names:
            if not isinstance(name, str) or not 1 <= len(name) <= MAX_CLASS_NAME or not name.isprintable():
                _fail("class_names", name, f"each name must be 1 to {MAX_CLASS_NAME} printable characters")
        if len(set(names)) != len(names):
            _fail("class_names", names, "the names must differ")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image the run trains on and samples."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def names(self) -> tuple[str, ...]:
        """The class names: the built-in dataset's, or the folder's subfolders (() when unlabelled)."""
        return BUILTIN_CLASS_NAMES.get(self.dataset, self.class_names)

    @property
    def source_label(self) -> str:
        """e.g. "FashionMNIST" or "image folder shapes/ (3 classes)": how reports name the data."""
        if self.dataset != "folder":
            return DATASET_LABELS[self.dataset]
        kind = f"{len(self.class_names)} classes" if self.class_names else "unlabelled"
        return f"folder {self.data_dir} ({kind})"


def data_defaults(dataset: str) -> tuple[int, int]:
    """(channels, image_size) a dataset gets when the user names neither: a built-in's own, 32 for folders
    (channels for folders are found from the images, so this 3 is only a placeholder)."""
    return BUILTIN_SHAPES.get(dataset, (3, FOLDER_SIZE_DEFAULT))


@dataclass(frozen=True)
class RunConfig:
    """Everything a run folder needs to rebuild its model, schedule and optimizer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_int("format_version", self.format_version, 1)
        if self.format_version > FORMAT_VERSION:
            _fail("format_version", self.format_version,
                  f"this run was written by a newer version (this one reads up to "
                  f"{FORMAT_VERSION}); update the workbench to open it")
        for name in ("in_channels", "out_channels"):
            if getattr(self.model, name) != self.data.channels:
                _fail(name, getattr(self.model, name), f"the network must see the data's {self.data.channels} "
                      "channel(s) (set --channels, which sets both)")
        names = self.data.names
        if self.model.num_classes and self.model.num_classes != len(names):
            allowed = (f"{self.data.source_label} has {len(names)} classes; use that or 0" if names else
                       f"{self.data.source_label} has no classes (a flat folder): use 0, or put the images in "
                       "two or more subfolders, one per class")
            _fail("num_classes", self.model.num_classes, allowed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError("config is not a JSON object")
        unknown = sorted(str(k)[:40] for k in data if k not in ("format_version", "model", "schedule", "train", "data"))
        if unknown:  # as inside a section: a misspelt or foreign key is a mistake, not something to ignore
            raise ConfigError(f"config has unknown top-level keys: {', '.join(unknown[:5])}"
                              f"{' …' if len(unknown) > 5 else ''} (it holds format_version, model, schedule, train, data)")
        version = data.get("format_version")
        if version is None:
            raise ConfigError("config misses the field format_version")
        _check_int("format_version", version, 1)
        if version > FORMAT_VERSION:
            _fail("format_version", version, f"this run was written by a newer version (this one "
                  f"reads up to {FORMAT_VERSION}); update the workbench to open it")
        parts = {}
        if version < 5 and "data" in data:
            raise ConfigError(f"config has a section format {version} does not know: 'data' "
                              "(a newer run with an edited format_version?)")
        for name, kind in (("model", ModelConfig), ("schedule", ScheduleConfig), ("train", TrainConfig),
                           ("data", DataConfig)):
            if version < 5 and name == "data":
                parts[name] = _data_of_old_format(data["train"])
                continue
            if name not in data:
                raise ConfigError(f"config misses the section {name!r}")
            section = data[name]
            if name == "schedule" and version == 1 and isinstance(section, dict):
                # Format 1 trained on the unscaled linear schedule: the run keeps it.
                section = {"scale_to_timesteps": False, **section}
            _check_fields_of_format(section, name, version)
            if name == "train" and version < 5 and isinstance(section, dict):
                if "dataset" not in section:
                    raise ConfigError("config section 'train' misses the fields: dataset")
                section = {k: v for k, v in section.items() if k != "dataset"}
            parts[name] = _dataclass_from_dict(kind, section, name)
        # Read as the current format: the fields it lacked now hold the values that reproduce it.
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        try:
            data = safejson.loads(text)
        except safejson.JSONNestingError:  # a hostile file nested 100,000 levels deep
            raise ConfigError("config.json is nested too deeply to be a run file") from None
        except ValueError as exc:  # not JSON, a number out of range
            raise ConfigError(f"config.json is not valid JSON ({safejson.describe(exc)})") from None
        return cls.from_dict(data)


# What every format-1 config.json holds and a run cannot do without: the network's shape, the
# schedule, and the pixel range its samples are decoded from. Keep this list fixed for format 1.
REQUIRED_FIELDS = {
    "model": ("name", "base_channels", "channel_mults", "num_res_blocks", "attention", "norm",
              "time_embed_dim"),
    "schedule": ("timesteps", "schedule", "beta_start", "beta_end"),
    "train": ("pixel_range", "optimizer"),   # and, in formats 1-4, dataset (now the data section's)
    "data": ("dataset", "image_size", "channels"),
}
# Formats 1-4 trained on 28x28 grayscale FashionMNIST or MNIST, named in `train.dataset`.
OLD_DATASETS = ("fashion_mnist", "mnist")


def _data_of_old_format(train: Any) -> DataConfig:
    """The data section a format 1-4 run implies: its `train.dataset` at 28x28, one channel."""
    dataset = train.get("dataset") if isinstance(train, dict) else None
    if dataset is not None and dataset not in OLD_DATASETS:
        _fail("dataset", dataset, "a format 1-4 run trained on " + " or ".join(OLD_DATASETS))
    return DataConfig(dataset=dataset or "fashion_mnist", image_size=28, channels=1)


# Fields a format introduced: an older file that holds one was not written by this project (or was
# edited by hand), and a newer file must hold the ones that shape its weights.
FIELDS_SINCE = {("model", "num_classes"): 3, ("train", "label_dropout"): 3, ("train", "label_dropout_mode"): 3,
                ("train", "prediction"): 4, ("train", "min_snr_gamma"): 4}
REQUIRED_SINCE = {("model", "num_classes"): 3}


def _check_fields_of_format(data: Any, section: str, version: int) -> None:
    if not isinstance(data, dict):
        return  # _dataclass_from_dict says so
    early = sorted(name for (sec, name), since in FIELDS_SINCE.items() if sec == section and version < since
                   and name in data)
    if early:
        raise ConfigError(f"config section {section!r} has fields that format {version} does not know: "
                          f"{', '.join(early)} (a newer run with an edited format_version?)")
    missing = sorted(name for (sec, name), since in REQUIRED_SINCE.items() if sec == section and version >= since
                     and name not in data)
    if missing:
        raise ConfigError(f"config section {section!r} misses the fields: {', '.join(missing)}")


def _dataclass_from_dict(kind: type, data: Any, section: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {section!r} is not a JSON object")
    # Fields added after format 1 may be absent (they take their defaults), but a run whose file
    # lacks what shapes its weights or its schedule would silently rebuild the wrong network.
    missing = [name for name in REQUIRED_FIELDS.get(section, ()) if name not in data]
    if missing:
        raise ConfigError(f"config section {section!r} misses the fields: {', '.join(missing)}")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config section {section!r} has unknown fields: {', '.join(unknown)}")
    try:
        return kind(**data)
    except TypeError as exc:  # pragma: no cover - every field has a default
        raise ConfigError(f"config section {section!r}: {exc}") from None


def objective_label(train: TrainConfig) -> str:
    """e.g. "v-pred, Min-SNR-5": the training objective where it is not the book's ('' for ε + MSE)."""
    parts = [f"{PREDICTION_LABELS[train.prediction]}-pred"] if train.prediction != "eps" else []
    if train.min_snr_gamma:
        parts.append(f"Min-SNR-{train.min_snr_gamma:g}")
    return ", ".join(parts)


def run_label(config: "RunConfig") -> str:
    """e.g. "ImprovedUNet + AdamW" (or "ImprovedUNet + AdamW (v-pred, Min-SNR-5)"): what the run list and
    the charts call a run's recipe."""
    label = f"{MODEL_LABELS[config.model.name]} + {OPTIMIZER_LABELS[config.train.optimizer]}"
    objective = objective_label(config.train)
    return f"{label} ({objective})" if objective else label


# Presets. DDPM with x̂0 clipped to the data range measured a little better on the improved demo run
# (N = 250: 5.71 against 5.98 unclipped, docs/results.md), so the blog's presets clip; `book` does not,
# so step 9 stays exact. `book` is step 9 exactly; `improved` is the blog's change done well;
# `quick` is the smallest run that still draws recognisable clothes on 2 CPU cores;
# `tiny` exercises the whole pipeline in about a minute (for trying the UI, and for tests).
PRESETS: dict[str, RunConfig] = {
    "book": RunConfig(
        model=ModelConfig(name="unet", base_channels=64),
        schedule=ScheduleConfig(timesteps=1000, schedule="linear"),
        train=TrainConfig(optimizer="adam", lr=1e-3, batch_size=128, epochs=10, pixel_range="unit"),
    ),
    "improved": RunConfig(
        model=ModelConfig(name="improved_unet", base_channels=32, channel_mults=(1, 2, 2),
                          num_res_blocks=1, attention=True, norm="group"),
        schedule=ScheduleConfig(timesteps=1000, schedule="linear"),
        train=TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.01, batch_size=128, epochs=10,
                          pixel_range="symmetric", ema_decay=0.999, grad_clip=1.0, warmup_steps=200,
                          clip_denoised=True),
    ),
    # Retuned from the ablation (docs/ablation.md): the ImprovedUNet and the EMA do the work, at the demo
    # width 12 with attention; Min-SNR-5 measured 10.4 against 11.9 without it at the same 300 s.
    "quick": RunConfig(
        model=ModelConfig(name="improved_unet", base_channels=12, channel_mults=(1, 2, 2),
                          num_res_blocks=1, attention=True, norm="group"),
        schedule=ScheduleConfig(timesteps=1000, schedule="linear"),
        train=TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.01, batch_size=128, epochs=0,
                          time_budget_s=300.0, pixel_range="symmetric", ema_decay=0.999, grad_clip=1.0,
                          warmup_steps=100, clip_denoised=True, min_snr_gamma=5.0),
    ),
    # Step 10's two scripts: UNetCond trained with labels always, then the same network with the
    # whole batch's labels dropped 10 % of the time for classifier-free guidance.
    "book-cond": RunConfig(
        model=ModelConfig(name="unet", base_channels=64, num_classes=10),
        schedule=ScheduleConfig(timesteps=1000, schedule="linear"),
        train=TrainConfig(optimizer="adam", lr=1e-3, batch_size=128, epochs=10, pixel_range="unit",
                          label_dropout=0.0, label_dropout_mode="batch"),
    ),
    "book-cfg": RunConfig(
        model=ModelConfig(name="unet", base_channels=64, num_classes=10),
        schedule=ScheduleConfig(timesteps=1000, schedule="linear"),
        train=TrainConfig(optimizer="adam", lr=1e-3, batch_size=128, epochs=10, pixel_range="unit",
                          label_dropout=0.1, label_dropout_mode="batch"),
    ),
    # The blog's network with a label embedding and a learned "no label" token, per-sample dropout.
    "improved-cfg": RunConfig(
        model=ModelConfig(name="improved_unet", base_channels=32, channel_mults=(1, 2, 2),
                          num_res_blocks=1, attention=True, norm="group", num_classes=10),
        schedule=ScheduleConfig(timesteps=1000, schedule="linear"),
        train=TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.01, batch_size=128, epochs=10,
                          pixel_range="symmetric", ema_decay=0.999, grad_clip=1.0, warmup_steps=200,
                          label_dropout=0.1, label_dropout_mode="sample", clip_denoised=True),
    ),
    "tiny": RunConfig(
        model=ModelConfig(name="improved_unet", base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                          attention=False, norm="group"),
        schedule=ScheduleConfig(timesteps=20, schedule="linear"),
        train=TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.01, batch_size=32, epochs=3, max_steps=48,
                          limit_images=512, pixel_range="symmetric", device="cpu", log_every=2,
                          sample_every_epochs=1, grid_steps=20, channels_last=False, checkpoint_every_s=0.0,
                          clip_denoised=True),
    ),
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        _fail("preset", name, "choose one of " + ", ".join(PRESETS))
    return PRESETS[name]


FIELD_ALIASES = {"model": "name", "model_name": "name"}  # flat names for ModelConfig.name


def field_section(key: str) -> tuple[str, str]:
    """(section, field) of a flat setting name such as "lr" or "model"; ConfigError if unknown."""
    key = FIELD_ALIASES.get(key, key)
    for section, kind in (("model", ModelConfig), ("schedule", ScheduleConfig), ("train", TrainConfig),
                          ("data", DataConfig)):
        if key in {f.name for f in fields(kind)}:
            return section, key
    raise ConfigError(f"unknown setting {key!r}")


def flat_value(config: RunConfig, key: str) -> Any:
    """The value of a flat setting name in `config` (the inverse of `override`)."""
    section, name = field_section(key)
    return getattr(getattr(config, section), name)


def override(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy of `config` with flat field changes routed to the section that owns each field.

    `None` means "not given" so CLI flags and form fields can be passed straight through.
    """
    sections: dict[str, dict[str, Any]] = {"model": {}, "schedule": {}, "train": {}, "data": {}}
    for key, value in changes.items():
        if value is None:
            continue
        section, name = field_section(key)
        sections[section][name] = value
    data = sections["data"]
    if data.get("dataset", config.data.dataset) != config.data.dataset:
        # Another source: its own size and channels unless given, and none of the old folder's record.
        channels, size = data_defaults(data["dataset"])
        data = {"data_dir": "", "fingerprint": "", "class_names": (), "image_size": size, "channels": channels,
                **data}
    new_data = replace(config.data, **data)
    # The network's channels are the data's: one setting, never two that disagree.
    model = {"in_channels": new_data.channels, "out_channels": new_data.channels, **sections["model"]}
    return replace(
        config,
        model=replace(config.model, **model),
        schedule=replace(config.schedule, **sections["schedule"]),
        train=replace(config.train, **sections["train"]),
        data=new_data,
    )
