"""`python -m core report`: a results page of runs (loss curves, sample grids side by side, the eval
table) or of a sweep (FD chart, loss curves, results table)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CliError
from ..store import report, runs
from ..work import sweeps
from .args import add_runs_dir, runs_dir_of


def add_parser(sub) -> None:
    rp = sub.add_parser("report", help="results page of runs: loss curves PNG, grids side by side, eval table")
    rp_what = rp.add_mutually_exclusive_group(required=True)
    rp_what.add_argument("--runs", nargs="+", help="run folders to compare")
    rp_what.add_argument("--sweep", metavar="NAME", help="a sweep instead: <NAME>_fd.png, <NAME>_loss.png and "
                         "<NAME>_table.md from its results (see `sweep`)")
    add_runs_dir(rp, help="with --sweep: folder of run folders (default checkpoints)")
    rp.add_argument("--out", default="docs", help="folder for loss_curves.png, sample_grids.png, results_table.md "
                    "and, once runs have step sweeps, steps_quality.png and sweep_table.md")
    rp.add_argument("--grid", default="final.png", help="which samples/*.png of each run to show")
    rp.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.sweep:
        return _report_sweep(args)
    infos = []
    for path in args.runs:
        info = runs.run_info(Path(path))
        if not info.readable or info.state == "damaged":
            raise CliError(info.error or f"run {path} cannot be read")
        infos.append(info)
    out = Path(args.out)
    written = [report.loss_curves_png(infos, out / "loss_curves.png")]
    grids = [(report.run_label(i), i.path / "samples" / args.grid) for i in infos]
    missing = [str(p) for _, p in grids if not p.is_file()]
    if missing:
        raise CliError(f"no sample grid {', '.join(missing)}; sample the runs first or pick --grid")
    written.append(report.grids_side_by_side_png(grids, out / "sample_grids.png"))
    (out / "results_table.md").write_text(report.eval_table(infos) + "\n", encoding="utf-8")
    written.append(out / "results_table.md")
    curve = report.steps_quality_png(infos, out / "steps_quality.png")
    if curve is not None:  # only once some run has few-step evaluations
        (out / "sweep_table.md").write_text(report.sweep_table(infos) + "\n", encoding="utf-8")
        written += [curve, out / "sweep_table.md"]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _report_sweep(args: argparse.Namespace) -> int:
    runs_dir, out, name = runs_dir_of(args), Path(args.out), args.sweep
    rows = sweeps.write_results(runs_dir, name)
    table = out / f"{name}_table.md"
    out.mkdir(parents=True, exist_ok=True)
    table.write_text(report.sweep_results_table(rows) + "\n", encoding="utf-8")
    written = [table]
    chart = report.sweep_fd_png(rows, out / f"{name}_fd.png", title=name)
    if chart is not None:
        written.append(chart)
    infos = [runs.run_info(runs.run_path(runs_dir, r["run"])) for r in rows if r["state"] != "missing"]
    readable = [i for i in infos if i.readable]
    if readable:
        labels = {r["run"]: f"{i}. {r['label']}" for i, r in enumerate(rows, 1)}
        written.append(report.loss_curves_png(readable, out / f"{name}_loss.png", x_axis="step", labels=labels,
                                              title=f"Training loss of the sweep {name}"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0

