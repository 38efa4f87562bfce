"""The data flags of `train` (--dataset, --data-dir, --image-size, --channels, --hflip) and the `data` command.

`python -m core data --dataset folder --data-dir PATH` prints what a folder holds before anyone
trains on it; `python -m core data --make-shapes DIR` writes the generated coloured-shapes folder
(core.data.shapes) for trying all of this offline. Everything a folder run needs to rebuild itself
(its fingerprint, class names and channels) is settled here, before a run folder exists.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..config import (CHANNEL_COUNTS, DATASET_NAMES, FOLDER_SIZE_DEFAULT, ConfigError, RunConfig, data_defaults,
                      override)
from ..data.datasets import load_images
from ..data.folder import ImageFolderError, resolve_data_config, scan_folder, summarize
from ..data.shapes import make_shapes_folder
from .args import add_data_root
from .argtypes import whole_number

DATA_FLAGS = ("dataset", "data_dir", "image_size", "channels", "hflip")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASET_NAMES,
                        help="training data (default fashion_mnist); folder: your own images in --data-dir")
    parser.add_argument("--data-dir", metavar="PATH",
                        help="--dataset folder: the folder of images (subfolders = classes; flat = unlabelled)")
    parser.add_argument("--image-size", type=whole_number, metavar="S",
                        help="16-64, a multiple of 4 (default: the dataset's own; 32 for folders)")
    parser.add_argument("--channels", type=whole_number, choices=CHANNEL_COUNTS,
                        help="1 grayscale or 3 colour (default: the dataset's own; for folders 3 when any "
                        "image has colour)")
    parser.add_argument("--hflip", action="store_const", const=True, default=None,
                        help="mirror training images left-right at random (augmentation)")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="--resume: train on the folder as it is now even though it changed since the run "
                        "was made")


def add_parser(sub) -> None:
    da = sub.add_parser("data", help="make a dataset available, show what an image folder holds, or make one",
                        description="Prepare a built-in dataset (Debian package, ./data, or download), show what "
                        "an image folder holds (count, sizes, colour, classes), or write the generated "
                        "coloured-shapes folder with --make-shapes.")
    da.add_argument("--dataset", choices=DATASET_NAMES, default="fashion_mnist", help="which dataset")
    add_data_root(da, help="folder to prepare (default ./data or $DDPM_DATA_ROOT)")
    da.add_argument("--data-dir", metavar="PATH", help="--dataset folder: the folder to look at")
    da.add_argument("--image-size", type=whole_number, metavar="S", default=None,
                    help="folders: the size to decode at (and cache) while looking (default 32)")
    da.add_argument("--make-shapes", metavar="DIR", help="write coloured shapes in DIR/<circle|square|triangle>/")
    da.add_argument("--per-class", type=whole_number, default=100, help="--make-shapes: images per class")
    da.set_defaults(handler=run)


def apply_train_arguments(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The config with the data flags applied and, for a folder, completed from the folder; a conditional
    run (--conditional or a conditional preset) gets one label per class of its data."""
    if args.data_dir is not None and (args.dataset or config.data.dataset) != "folder":
        raise ConfigError(f"data_dir = {args.data_dir!r} is not allowed: it belongs to --dataset folder "
                          "(add --dataset folder)")
    wants_labels = bool(getattr(args, "conditional", None)) or config.model.num_classes > 0
    # The classes are known only once the data is: unconditional until then.
    config = override(config, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                      channels=args.channels, hflip=args.hflip, num_classes=0 if wants_labels else None)
    if config.data.dataset == "folder":
        data = resolve_data_config(config.data, channels_given=args.channels is not None)
        config = override(config, fingerprint=data.fingerprint, class_names=data.class_names, data_dir=data.data_dir,
                          channels=data.channels)
    if wants_labels:
        if not config.data.names:
            raise ConfigError(f"num_classes is not allowed: {config.data.data_dir} is unlabelled (no class "
                              "subfolders); put the images in two or more subfolders, one per class, or train "
                              "without --conditional")
        config = override(config, num_classes=len(config.data.names))
    return config


def check_resumed_data(saved: RunConfig, allow_change: bool) -> RunConfig:
    """A resumed folder run: refused when its folder changed, unless allowed (then the new state is recorded)."""
    data = saved.data
    if data.dataset != "folder":
        if allow_change:
            raise ConfigError("--allow-data-change is not allowed: it is for runs trained on an image folder")
        return saved
    scan = scan_folder(data.data_dir)
    if scan.fingerprint == data.fingerprint:
        return saved
    if not allow_change:
        raise ImageFolderError(f"data_dir = {data.data_dir!r} is not allowed: the folder changed since the run was "
                               "made (files added, removed or edited); add --allow-data-change to train on it as it "
                               "is now, or restore the folder")
    if scan.class_names != data.class_names:
        raise ImageFolderError(f"data_dir = {data.data_dir!r} is not allowed: its classes are now "
                               f"{', '.join(scan.class_names) or 'none'}, the run was made with "
                               f"{', '.join(data.class_names) or 'none'}; the network's labels would mean other things")
    return replace(saved, data=replace(data, fingerprint=scan.fingerprint))


def run(args: argparse.Namespace) -> int:
    if args.make_shapes:
        root = Path(args.make_shapes)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ConfigError(f"--make-shapes = {args.make_shapes!r} is not allowed: it exists and is not an empty "
                              "folder; give a new folder")
        size = args.image_size or FOLDER_SIZE_DEFAULT
        replace_check = override(RunConfig(), dataset="folder", data_dir=str(root), image_size=size)  # checks size
        if args.per_class < 2:
            raise ConfigError(f"--per-class = {args.per_class} is not allowed: give at least 2")
        make_shapes_folder(root, per_class=args.per_class, size=replace_check.data.image_size)
        print(f"wrote {3 * args.per_class} images ({args.per_class} per class, {size}x{size} RGB) in {root}; "
              f"train on them with `python -m core train --dataset folder --data-dir {root}`")
        return 0
    if args.dataset == "folder":
        if not args.data_dir:
            raise ConfigError("--dataset folder needs --data-dir PATH, the folder of images")
        size = args.image_size or data_defaults("folder")[1]
        override(RunConfig(), dataset="folder", data_dir=args.data_dir, image_size=size)  # one line for a bad size
        summary = summarize(args.data_dir, size)
        print(f"{args.data_dir}: " + "\n  ".join(summary.lines()))
        return 0
    if args.data_dir:
        raise ConfigError(f"--data-dir is not allowed with --dataset {args.dataset}: it is for --dataset folder "
                          "(use --data-root for where the built-in datasets live)")
    train = load_images(args.dataset, "train", args.data_root)
    test = load_images(args.dataset, "test", args.data_root)
    c, h, w = train.shape
    print(f"{args.dataset}: {len(train)} training and {len(test)} test images ready ({w}x{h}, "
          f"{'colour' if c == 3 else 'grayscale'}, {len(train.class_names)} classes)")
    return 0
