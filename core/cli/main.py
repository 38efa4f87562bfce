"""`python -m core train | sample | eval | sweep | bench | report | data | queue | runs`: the same engine
the dashboard uses. This module only builds the top-level parser from one module per command (each
with `add_parser(sub)`, which sets the command's handler) and turns the engine's errors into exit
statuses; the argument groups several commands share are in args.py.

Every user mistake (a bad flag value, a damaged run, a missing dataset) ends with one line on
stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..config import ConfigError
from ..data.datasets import DatasetNotFoundError
from ..errors import CliError, RunError
from ..train import distributed
from ..train.training import DiskFull, TrainingDiverged
from . import bench, data, evaluate, queue, report, runs, sample, sweep, train
from .args import EXIT_FAILED, EXIT_USAGE, CliParser, runs_dir_of  # noqa: F401 - runs_dir_of: re-exported

MAX_ERROR_LINE = 600  # characters: a hostile file must not print pages (its values are cut where named)
# In the order `python -m core --help` lists them.
COMMANDS = (train, sample, evaluate, sweep, bench, report, data, queue, runs)


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m core", description="Train, sample and evaluate the book's DDPM and "
                       "the ImprovedUNet on FashionMNIST / MNIST.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CliParser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def error_line(exc: BaseException) -> str:
    """An error as one line of at most MAX_ERROR_LINE characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= MAX_ERROR_LINE else text[:MAX_ERROR_LINE - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun every rank runs this; rank 0 alone prints a user error, all exit alike.
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        return args.handler(args)
    except (ConfigError, RunError, DatasetNotFoundError, CliError) as exc:
        if main_rank:
            print(f"error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingDiverged, DiskFull) as exc:  # the run is already marked failed in its folder
        if main_rank:
            print(f"error: {error_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except distributed.PeerFailure as exc:  # every rank says why it ends; the run is marked interrupted
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
