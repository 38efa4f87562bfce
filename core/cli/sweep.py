"""`python -m core sweep`: make a sweep (grid or ablation path) and train and score its runs in one command.

    python -m core sweep --preset tiny --vary optimizer=adam,adamw --budget-steps 20 --eval-n 64
    python -m core sweep --path blog-demo --budget-images 96000 --eval-n 1000 --name blog-ablation
    python -m core sweep --resume blog-ablation      # continue after Ctrl-C or a crash

Every bad definition (unknown factor, empty grid, more than 64 runs, a budget of 0) is refused
before a folder exists.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..store import runs
from ..work import sweeps
from .args import add_data_root, add_runs_dir, runs_dir_of
from .argtypes import number, whole_number
from ..config import PRESETS, SAMPLER_NAMES, DEFAULT_FEW_STEP_SAMPLER, DEFAULT_FEW_STEPS
from .console import EXIT_FAILED, EXIT_SIGNAL, ProgressBar, StopOnSignals
from ..data.sources import load_run_images
from ..errors import CliError
from ..evaluation.scoring import evaluate_run
from ..train.training import train_run


def add_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="a grid or ablation path of runs on one budget, trained and scored in one go",
                        description="Make a sweep (every combination of the --vary factors, or one change at a "
                        "time along a path), train its runs one after another on the same budget, score each, "
                        "and write results.csv / results.json in <runs>/sweeps/<name>/.")
    add_arguments(sw)
    sw.set_defaults(handler=lambda args: run(args, runs_dir_of(args)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the base every run starts from "
                        "(default: book for --path blog, else required)")
    parser.add_argument("--vary", action="append", metavar="NAME=V1,V2", default=[],
                        help="a factor and its values, e.g. optimizer=adam,adamw or channel_mults=1/2,1/2/2; repeat "
                        f"for more factors ({', '.join(sweeps.factor_names())})")
    parser.add_argument("--mode", choices=sweeps.MODES, default="grid",
                        help="grid: every combination; path: one change at a time from the base, each --vary "
                        "giving the value it moves to, in the order given")
    parser.add_argument("--path", choices=sorted(sweeps.ABLATION_PATHS),
                        help="a named ablation path: blog = book -> +ImprovedUNet -> +AdamW -> +lr -> +[-1,1] -> "
                        "+EMA -> +clip/warm-up (= improved), at the presets' widths; blog-demo = the same at the "
                        "demo runs' widths (book 16, improved 12)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-s", type=number, metavar="SECONDS", help="training time per run (wall clock, "
                        "evaluation not counted)")
    budget.add_argument("--budget-steps", type=whole_number, help="optimizer steps per run")
    budget.add_argument("--budget-images", type=whole_number, help="training images per run (fair when the "
                        "machine is busy, or batch sizes differ)")
    parser.add_argument("--eval-n", type=whole_number, default=0,
                        help="score every run at this many samples once it is trained (0: do not score)")
    parser.add_argument("--eval-sampler", choices=SAMPLER_NAMES, default=DEFAULT_FEW_STEP_SAMPLER,
                        help=f"sampler for the scores (default {DEFAULT_FEW_STEP_SAMPLER})")
    parser.add_argument("--eval-steps", type=whole_number, default=DEFAULT_FEW_STEPS,
                        help=f"sampler steps for the scores (default {DEFAULT_FEW_STEPS})")
    parser.add_argument("--seed", type=whole_number, help="one seed for every run (default: the preset's)")
    parser.add_argument("--name", help="sweep name (A-Z a-z 0-9 . _ -); default sweep-<time>")
    parser.add_argument("--resume", metavar="NAME", help="continue the sweep NAME (untrained or stopped runs, "
                        "missing scores)")
    parser.add_argument("--queue", action="store_true", help="make the sweep and add its runs to the run queue "
                        "(trained by the dashboard or `python -m core queue run`) instead of training them now")
    parser.add_argument("--create-only", action="store_true", help="make the sweep and its run folders, train "
                        "nothing (train them later with --resume)")
    add_runs_dir(parser)
    add_data_root(parser, help="folder holding FashionMNIST/raw or MNIST/raw")
    parser.add_argument("--device", default="auto", help="where to score (each run trains on its own config's device)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def definition_of(args: argparse.Namespace) -> sweeps.Sweep:
    """The planned sweep from the flags; raises before anything is created."""
    kinds = [(kind, value) for kind, value in (("seconds", args.budget_s), ("steps", args.budget_steps),
                                               ("images", args.budget_images)) if value is not None]
    if not kinds:
        raise CliError("a sweep needs a budget: give --budget-s, --budget-steps or --budget-images")
    budget = sweeps.Budget(*kinds[0])
    if args.path is None and args.preset is None:
        raise CliError("a sweep needs a base: give --preset (e.g. tiny, book, improved), or --path blog")
    factors = [sweeps.parse_factor(spec) for spec in args.vary]
    evaluation = sweeps.default_evaluation(args.eval_n, args.eval_sampler, args.eval_steps)
    name = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    return sweeps.plan(name, args.preset, budget, mode=args.mode, factors=factors, path=args.path,
                       evaluation=evaluation, seed=args.seed)


def run(args: argparse.Namespace, runs_dir: Path) -> int:
    if args.resume:
        if args.vary or args.path or args.preset or args.name:
            raise CliError("--resume continues a sweep as it was defined: leave out --preset, --vary, --path, --name")
        name = args.resume
        sweeps.load(runs_dir, name)  # a missing or damaged sweep is refused before any work
    else:
        sweep = definition_of(args)
        name = sweep.name
        folder = (sweeps.enqueue if args.queue else sweeps.create)(runs_dir, sweep)
        print(f"sweep {name}: {len(sweep.runs)} runs, {sweep.budget.describe()}, in {folder}"
              + (" (queued)" if args.queue else ""), flush=True)
        if args.create_only or args.queue:
            sweeps.write_results(runs_dir, name)
            return 0
    loaded_images: dict[object, object] = {}
    stopped = StopOnSignals()

    def train(run_dir: Path) -> None:
        config = runs.load_config(run_dir)
        dataset = config.data  # one load per data section: runs of a sweep usually share it
        if dataset not in loaded_images:
            loaded_images[dataset] = load_run_images(dataset, "train", args.data_root)
        bar = None if args.quiet else ProgressBar()
        try:
            train_run(run_dir, resume=True, images=loaded_images[dataset], data_root=args.data_root,
                      on_progress=bar.update if bar else None, stop_event=stopped.event)
        finally:
            if bar:
                bar.close()

    def evaluate(run_dir: Path, config) -> None:
        if stopped.event.is_set():
            return
        entry = evaluate_run(run_dir, config, device=args.device, data_root=args.data_root)
        if entry is not None:
            print(f"  {run_dir.name}: FD {entry['fd']:.2f} ({entry['fd_ratio']:.1f}x the floor), "
                  f"{entry['setting']}, N = {entry['n']}", flush=True)

    with stopped:
        rows = sweeps.run(runs_dir, name, train, evaluate, say=lambda line: print(line, flush=True))
    print_table(rows)
    print(f"results: {sweeps.sweep_path(runs_dir, name) / 'results.csv'} and results.json")
    if stopped.signal is not None:
        return EXIT_SIGNAL[stopped.signal]
    failed = [row["run"] for row in rows if row["state"] not in ("finished",)]
    if failed:  # a sweep with failed runs is not a success: scripts must see it
        print(f"error: {len(failed)} of {len(rows)} runs did not finish ({', '.join(failed[:3])}"
              f"{' …' if len(failed) > 3 else ''}); fix the cause, then continue with --resume {name}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def print_table(rows: list[dict]) -> None:
    def cell(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"{'run':<40} {'state':<10} {'steps':>6} {'loss':>8} {'FD':>8} {'ratio':>6}")
    for row in rows:
        print(f"{row['run'][:40]:<40} {row['state']:<10} {row['steps']:>6} {cell(row['final_loss'], '8.4f')} "
              f"{cell(row['fd'], '8.2f')} {cell(row['fd_ratio'], '6.1f')}", file=sys.stdout)
