"""What several commands share: the parser that turns argparse's errors into one line and exit 2,
the exit statuses, and argument groups declared once (the sampler flags of `sample` and `eval`, the
runs folder, the data root, the device) so their help text cannot drift apart."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import CLIP_NAMES, DEVICE_NAMES, SAMPLER_NAMES, SPACING_NAMES
from ..errors import CliError
from ..store import runs
from .argtypes import number, whole_number
from .console import EXIT_FAILED, EXIT_USAGE  # noqa: F401 - re-exported to the command modules


RUNS_DIR_HELP = "folder of run folders (default checkpoints)"
DATA_ROOT_HELP = "folder holding FashionMNIST/raw or MNIST/raw (env DDPM_DATA_ROOT)"


class CliParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        # prog is "python -m core queue move" for a sub-subcommand: name the whole command, not its last word
        words = self.prog.split()
        command = " ".join(["python", "-m", "core", *words[words.index("core") + 1:]] if "core" in words else words)
        self.exit(EXIT_USAGE, f"error: {message} (see `{command} --help`)\n")


def add_runs_dir(parser, help: str = RUNS_DIR_HELP):
    """--runs-dir; read it with runs_dir_of(), which refuses an empty value or a file."""
    parser.add_argument("--runs-dir", default=None, help=help)
    return parser


def add_data_root(parser, help: str = DATA_ROOT_HELP) -> None:
    parser.add_argument("--data-root", help=help)


def add_device(parser, help: str, default: str | None = "auto") -> None:
    """--device; default None where a run's own config decides (train)."""
    parser.add_argument("--device", choices=DEVICE_NAMES, default=default, help=help)


def add_sampler_flags(parser) -> None:
    """The five flags that make a SampleConfig's sampler part: `sample` and `eval` take the same ones."""
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm",
                        help="ddpm (the book), ddim, dpmpp2m (DPM-Solver++(2M)) or dpmpp2m-sde")
    parser.add_argument("--steps", type=whole_number, default=0, help="reverse steps (not ddpm; default T)")
    parser.add_argument("--eta", type=number, default=0.0, help="DDIM noise: 0 deterministic, 1 like DDPM")
    parser.add_argument("--spacing", choices=SPACING_NAMES, default="uniform",
                        help="timesteps of the few-step samplers: even in t, or even in log-SNR")
    parser.add_argument("--clip", choices=CLIP_NAMES, default="auto",
                        help="clip x̂0 to the data range (auto: the run's default for ddpm, on for the others)")


def runs_dir_of(args: argparse.Namespace) -> Path:
    """--runs-dir, checked: an empty value or a path to a file is a mistake, not the default."""
    if args.runs_dir is None:
        return runs.DEFAULT_RUNS_DIR
    if not args.runs_dir.strip():
        raise CliError("--runs-dir = '' is not allowed: give a folder, or leave the flag out for checkpoints/")
    path = Path(args.runs_dir)
    if path.exists() and not path.is_dir():
        raise CliError(f"--runs-dir = {args.runs_dir!r} is not allowed: it is a file, not a folder")
    return path
