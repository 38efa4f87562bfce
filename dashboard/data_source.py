"""The Train form's data source: a built-in dataset or the user's own image folder, its size and channels.

For a folder the field shows what core found there BEFORE anything trains (count, sizes, colour,
classes, skipped files), through the same `core.data.folder.summarize` that `python -m core data
--dataset folder` prints, or the very line the CLI refuses it with. The run is made from these values
by `config_with_data`, which goes through the CLI's own `apply_train_arguments`, so a form run and a
`--dataset folder` run get the same DataConfig (fingerprint, class names, channels) and the same
refusals. Widget keys are `f_<field>` like the rest of the Train form; presets never touch them
(a preset is a recipe, the data is the user's).

The other pages get a run's own images here too (`run_images`, `source_images`): a folder run's
pictures at the run's size and channels, for the Forward process page and the per-timestep losses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import streamlit as st

from core.cli.data import apply_train_arguments
from core.config import (BUILTIN_CLASS_NAMES, BUILTIN_SHAPES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ConfigError, DataConfig,
                         RunConfig, data_defaults, override)
from core.data.datasets import DatasetNotFoundError, ImageSet, ensure_dataset
from core.data.folder import FolderSummary, scan_folder, summarize
from core.data.sources import load_run_images
from core.store import runs
from dashboard.state import runs_dir

SOURCE_LABELS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "folder": "Image folder"}
DATA_FIELDS = ("dataset", "data_dir", "image_size", "channels", "hflip")
DEFAULTS = {"dataset": "fashion_mnist", "data_dir": "", "image_size": 28, "channels": 1, "hflip": False}


@st.cache_data(ttl=60, show_spinner=False)
def installed(dataset: str) -> bool:
    """MNIST and CIFAR-10 are offered only where their files are (no download from a page render)."""
    try:
        ensure_dataset(dataset, download=False)
    except (DatasetNotFoundError, ConfigError, OSError):
        return False
    return True


def sources() -> list[str]:
    """FashionMNIST always (its error says how to get it), the others where installed, then a folder."""
    return ["fashion_mnist"] + [d for d in ("mnist", "cifar10") if installed(d)] + ["folder"]


@st.cache_data(max_entries=16, show_spinner="Looking at the folder…")
def _summary(path: str, size: int, fingerprint: str) -> FolderSummary:
    del fingerprint  # part of the cache key only: a changed folder is looked at again
    return summarize(path, size)


def folder_report(path: str, size: int) -> FolderSummary | str:
    """What `python -m core data --dataset folder --data-dir PATH --image-size S` says: the folder's summary,
    or the one line it refuses the folder with (as the CLI prints it after "error: ")."""
    try:
        override(RunConfig(), dataset="folder", data_dir=path, image_size=size)  # an empty path, a bad size
        return _summary(path, size, scan_folder(path).fingerprint)
    except ConfigError as exc:  # ImageFolderError is one
        return str(exc)
    except OSError as exc:  # a folder that vanished or became unreadable between the checks
        return f"data_dir = {path!r} is not allowed: {exc.strerror or exc}; check the folder and its permissions"


def form_values() -> dict:
    """The data fields' current values (for the form memory and `config_with_data`)."""
    return {name: st.session_state.get(f"f_{name}", DEFAULTS[name]) for name in DATA_FIELDS}


def _current_report() -> FolderSummary | str | None:
    values = form_values()
    if values["dataset"] != "folder":
        return None
    return folder_report(str(values["data_dir"]).strip(), int(values["image_size"]))


def _source_changed() -> None:
    """Another source: its own size and channels (a folder's channels follow what is found in it)."""
    channels, size = data_defaults(st.session_state["f_dataset"])
    st.session_state["f_image_size"], st.session_state["f_channels"] = size, channels
    _folder_changed()


def _folder_changed() -> None:
    """A new folder path: the channels default to what the images are (3 when any has colour)."""
    report = _current_report()
    if isinstance(report, FolderSummary):
        st.session_state["f_channels"] = 3 if report.colour else 1


def class_names() -> tuple[str, ...]:
    """The classes conditional training would get: the built-in dataset's, or the folder's subfolders."""
    values = form_values()
    if values["dataset"] != "folder":
        return BUILTIN_CLASS_NAMES.get(values["dataset"], ())
    report = _current_report()
    return tuple(report.class_counts) if isinstance(report, FolderSummary) else ()


def summary_ui(report: FolderSummary | str) -> None:
    if isinstance(report, str):
        st.error(report, icon=":material/folder_off:")
        return
    lines = report.lines()
    st.success(lines[0], icon=":material/folder_open:")
    for line in lines[1:]:
        (st.warning if line.startswith("skipped") else st.caption)(line)


def data_source_ui() -> None:
    """Source, folder path (with what is in it), image size, channels, horizontal flip."""
    for name, value in DEFAULTS.items():
        st.session_state.setdefault(f"f_{name}", value)
    offered = sources()
    if st.session_state["f_dataset"] not in offered:  # remembered from a server where it was installed
        st.session_state["f_dataset"] = "fashion_mnist"
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
    c1.selectbox("Data", offered, format_func=SOURCE_LABELS.get, key="f_dataset", on_change=_source_changed,
                 help="A built-in dataset, or a folder of your own pictures (PNG, JPEG, WebP, BMP, GIF); two or "
                      "more subfolders are the classes")
    c2.number_input("Image size", min_value=MIN_IMAGE_SIZE, max_value=MAX_IMAGE_SIZE, step=4, key="f_image_size",
                    on_change=_folder_changed, help="pixels per side, a multiple of 4: each image's shorter side is "
                                                    "resized to it and the centre cropped")
    c3.selectbox("Channels", (1, 3), key="f_channels",
                 format_func={1: "1 (grayscale)", 3: "3 (colour)"}.get,
                 help="a folder: 3 when any image has colour, unless you choose")
    c4.toggle("Horizontal flip", key="f_hflip", help="mirror half of each batch at random while training")
    if st.session_state["f_dataset"] == "folder":
        st.text_input("Image folder", key="f_data_dir", on_change=_folder_changed,
                      placeholder=str(Path.home() / "pictures"),
                      help="a path on the machine that runs this dashboard; subfolders = classes, flat = unlabelled")
        summary_ui(_current_report())


def config_with_data(config: RunConfig, conditional: bool) -> RunConfig:
    """The form's config with the data fields applied exactly as `python -m core train` applies its
    --dataset/--data-dir/--image-size/--channels/--hflip (and, conditional, one label per class)."""
    values = form_values()
    folder = values["dataset"] == "folder"
    args = argparse.Namespace(dataset=values["dataset"], data_dir=str(values["data_dir"]).strip() if folder else None,
                              image_size=int(values["image_size"]), channels=int(values["channels"]),
                              hflip=bool(values["hflip"]), conditional=conditional)
    return apply_train_arguments(override(config, num_classes=0), args)


# -- a run's own images, for the pages that show or score data ------------------------------------------
RUN_SOURCE = "run:"   # Forward process source keys: a built-in dataset's name, or "run:" + a run's name


def data_label(data: DataConfig) -> str:
    """Short: "FashionMNIST", "CIFAR-10 16×16×1", "folder shapes/ · 3 classes · 32×32×3"."""
    shape = f"{data.image_size}×{data.image_size}×{data.channels}"
    if data.dataset != "folder":
        native = BUILTIN_SHAPES[data.dataset] == (data.channels, data.image_size)
        return SOURCE_LABELS[data.dataset] + ("" if native else f" {shape}")
    kind = f"{len(data.class_names)} classes" if data.class_names else "unlabelled"
    return f"folder {Path(data.data_dir).name}/ · {kind} · {shape}"


@st.cache_resource(show_spinner="Loading the images…", max_entries=4)
def _images(data_json: str, split: str) -> ImageSet:
    return load_run_images(DataConfig(**json.loads(data_json)), split)


def run_images(data: DataConfig, split: str = "train") -> ImageSet:
    """A run's images at its shape (uint8 (N, C, H, W)); a folder has one split, its training images."""
    split = "train" if data.dataset == "folder" else split
    return _images(json.dumps(dataclasses.asdict(data)), split)


def installed_datasets() -> tuple[str, ...]:
    """The built-in datasets this machine has (or can prepare without a download): the only ones to offer."""
    return tuple(d for d in SOURCE_LABELS if d != "folder" and installed(d))


def forward_sources(infos: list[runs.RunInfo], builtin: tuple[str, ...]) -> dict[str, str]:
    """The built-in datasets given (those installed), then every run whose data is not a built-in at its
    own shape."""
    offered = {d: SOURCE_LABELS[d] for d in builtin}
    for info in infos:
        data = info.config.data if info.readable and info.config is not None else None
        if data is not None and (data.dataset == "folder" or BUILTIN_SHAPES[data.dataset] != (data.channels,
                                                                                              data.image_size)):
            offered[RUN_SOURCE + info.name] = f"run {info.name}: {data_label(data)}"
    return offered


def source_images(source: str) -> ImageSet:
    """The training images of a Forward process source; raises RunError, ConfigError, DatasetNotFoundError."""
    if source.startswith(RUN_SOURCE):
        return run_images(runs.load_config(runs_dir() / source[len(RUN_SOURCE):]).data)
    channels, size = data_defaults(source)
    return run_images(DataConfig(dataset=source, image_size=size, channels=channels))
