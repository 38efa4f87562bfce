"""`python -m core data`: make a dataset available (Debian's package, ./data, or torchvision's download)."""
from __future__ import annotations

import argparse

from ..config import DATASET_NAMES
from ..data.datasets import load_images
from .args import add_data_root


def add_parser(sub) -> None:
    da = sub.add_parser("data", help="make a dataset available (Debian package, ./data, or download)")
    da.add_argument("--dataset", choices=DATASET_NAMES, default="fashion_mnist", help="which dataset")
    add_data_root(da, help="folder to prepare (default ./data or $DDPM_DATA_ROOT)")
    da.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    train = load_images(args.dataset, "train", args.data_root)
    test = load_images(args.dataset, "test", args.data_root)
    print(f"{args.dataset}: {len(train)} training and {len(test)} test images ready")
    return 0

