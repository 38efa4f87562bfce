"""`python -m core bench`: speed of training and sampling on this device, as ratios measured in one
run (runner.py), the book's own step-9 code to measure against (reference.py), FLOP counts
(flops.py), data-parallel scaling (`--ddp N`, scaling.py), and own-data figures: a folder's load time
and training at another image shape (`--data-load N`, `--image-size/--channels`, data_load.py)."""
from __future__ import annotations

import argparse

from . import data_load, runner, scaling
from .runner import add_arguments, run_bench


def run(args: argparse.Namespace) -> int:
    if args.ddp:
        return scaling.run(args)
    return data_load.run(args) if data_load.wants(args) else runner.run(args)


__all__ = ["add_arguments", "run", "run_bench"]
