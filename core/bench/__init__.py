"""`python -m core bench`: speed of training and sampling on this device, as ratios measured in one
run (runner.py), the book's own step-9 code to measure against (reference.py), FLOP counts
(flops.py), and data-parallel scaling (`--ddp N`, scaling.py)."""
from __future__ import annotations

import argparse

from . import runner, scaling
from .runner import add_arguments, run_bench


def run(args: argparse.Namespace) -> int:
    return scaling.run(args) if args.ddp else runner.run(args)


__all__ = ["add_arguments", "run", "run_bench"]
