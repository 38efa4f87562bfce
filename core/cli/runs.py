"""`python -m core runs`: the runs in a runs folder with their state and last loss, or (--models) the
parameters and FLOPs of each preset's network."""
from __future__ import annotations

import argparse
import json

from ..bench.flops import model_costs
from ..config import objective_label
from ..store import runs
from .args import add_runs_dir, runs_dir_of


def add_parser(sub) -> None:
    ru = sub.add_parser("runs", help="list runs (or --models: parameters and FLOPs of each network)")
    add_runs_dir(ru)
    ru.add_argument("--models", action="store_true", help="print parameters and FLOPs per image of each model")
    ru.add_argument("--json", action="store_true", help="machine-readable output")
    ru.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.models:
        return _print_models(args.json)
    infos = runs.list_runs(runs_dir_of(args))
    rows = []
    for info in infos:
        cfg = info.config
        rows.append({
            "name": info.name, "state": info.state,
            "model": cfg.model.name if cfg else "?", "optimizer": cfg.train.optimizer if cfg else "?",
            "dataset": cfg.data.dataset if cfg else "?", "step": info.step,
            "objective": objective_label(cfg.train) if cfg else "?",  # '' for the book's ε + MSE
            "last_loss": info.last_loss, "error": info.error, "fallback": info.fallback,
        })
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no runs yet: train one with `python -m core train --preset quick`")
        return 0
    print(f"{'name':40} {'state':11} {'model':14} {'optimizer':9} {'dataset':13} {'step':>7} {'loss':>8}")
    for r in rows:
        loss = f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "-"
        objective = f"  ({r['objective']})" if r["objective"] else ""  # only where not the book's
        print(f"{r['name'][:40]:40} {r['state']:11} {r['model']:14} {r['optimizer']:9} {r['dataset']:13} "
              f"{r['step']:>7} {loss:>8}{objective}")
        if r["error"] and r["state"] in ("damaged", "failed"):
            print(f"    {r['error']}")
        if r["fallback"]:
            print(f"    note: {r['fallback']}")
    return 0


def _print_models(as_json: bool) -> int:
    rows = model_costs()
    if as_json:
        print(json.dumps(rows))
        return 0
    print(f"{'preset':10} {'model':14} {'params':>10} {'fwd GFLOP/img':>14} {'train GFLOP/img':>16} {'vs book':>8}")
    for r in rows:
        print(f"{r['preset']:10} {r['model']:14} {r['params']:>10,} {r['forward_gflop']:>14.3f} "
              f"{r['train_gflop']:>16.3f} {r['train_vs_book']:>7.2f}x")
    return 0

