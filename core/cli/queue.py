"""`python -m core queue ...`: the run queue shared with the dashboard's Train page (add, list,
remove, move, resume, pause, clear, eval) and `queue run`, which works it in this process."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import CliError, RunError
from ..config import SAMPLER_NAMES
from ..work import queue as run_queue
from .args import CliParser, add_data_root, add_device, add_runs_dir, runs_dir_of
from .argtypes import whole_number
from .console import EXIT_SIGNAL, StopOnSignals


def add_parser(sub) -> None:
    qu = sub.add_parser("queue", help="queue runs to train one after another (shared with the dashboard)",
                        description="The run queue: queue.json in the runs folder, shared with the dashboard's "
                        "Train page. One run trains at a time; a failed run does not stop the queue.")
    qs = qu.add_subparsers(dest="queue_command", required=True, parser_class=CliParser)

    add = add_runs_dir(qs.add_parser("add", help="queue existing runs (in this order)"))
    add.add_argument("runs", nargs="+", metavar="RUN", help="run names (folders in the runs folder)")
    ls = add_runs_dir(qs.add_parser("list", help="the queue: position, id, run, state, error"))
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rm = add_runs_dir(qs.add_parser("remove", help="take an entry off the queue (not the running one)"))
    rm.add_argument("id", help="entry id, from `queue list`")
    mv = add_runs_dir(qs.add_parser("move", help="move a queued entry to another place in line"))
    mv.add_argument("id", help="entry id, from `queue list`")
    mv.add_argument("--to", type=whole_number, required=True, metavar="N", help="1-based place in the waiting line")
    add_runs_dir(qs.add_parser("resume", help="put stopped and interrupted entries back in line and unpause"))
    add_runs_dir(qs.add_parser("pause", help="start no further run (the current one trains on)"))
    add_runs_dir(qs.add_parser("clear", help="drop finished and failed entries (the runs stay)"))
    ev = add_runs_dir(qs.add_parser("eval", help="evaluate every run the queue finishes (or --off)"))
    ev.add_argument("--sampler", choices=SAMPLER_NAMES, help="sampler to score with")
    ev.add_argument("--steps", type=whole_number, help="reverse steps (0 = T; ddpm always runs T)")
    ev.add_argument("--n", type=whole_number, help="number of images scored (compare only at the same N)")
    ev.add_argument("--off", action="store_true", help="no evaluation")
    rn = add_runs_dir(qs.add_parser("run", help="work the queue here until nothing is queued or it pauses "
                                     "(Ctrl-C stops the current run, which stays `stopped`)"))
    add_data_root(rn)
    add_device(rn, "where to evaluate")
    qu.set_defaults(handler=run)


def _format_time(value: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(value)) if value else "-"


def _print_queue(current: run_queue.Queue) -> None:
    state = "paused" if current.paused else "active"
    evaluation = current.eval.label if current.eval else "off"
    print(f"queue {state}; evaluation after each run: {evaluation}")
    if not current.entries:
        print("nothing queued: `python -m core queue add RUN`, or `python -m core train ... --queue`")
        return
    print(f"{'pos':>3} {'id':8} {'run':40} {'state':11} {'started':8} {'ended':8} error")
    for entry in current.entries:
        position = current.position(entry.id)
        print(f"{position or '-':>3} {entry.id:8} {entry.run[:40]:40} {entry.state:11} "
              f"{_format_time(entry.started_at):8} {_format_time(entry.ended_at):8} {entry.error or ''}")


def run(args: argparse.Namespace) -> int:
    runs_dir = runs_dir_of(args)
    command = args.queue_command
    if command != "list":  # a worker killed on the last entry left it `running`: say interrupted now
        run_queue.recover(runs_dir)
    else:
        current = run_queue.recover_view(runs_dir)
    if command == "add":
        added = run_queue.add(runs_dir, args.runs)
        print("queued " + ", ".join(f"{e.run} (entry {e.id})" for e in added))
    elif command == "list":
        if args.json:
            print(json.dumps({"paused": current.paused, "eval": current.eval.to_dict() if current.eval else None,
                              "entries": [{**e.to_dict(), "position": current.position(e.id)}
                                          for e in current.entries]}))
        else:
            _print_queue(current)
    elif command == "remove":
        entry = run_queue.remove(runs_dir, args.id)
        print(f"removed entry {entry.id} ({entry.run}); the run folder stays")
    elif command == "move":
        run_queue.move(runs_dir, args.id, args.to)
        print(f"moved entry {args.id} to place {args.to}")
    elif command == "resume":
        current = run_queue.resume(runs_dir)
        print(f"queue resumed: {len(current.queued)} run(s) waiting")
    elif command == "pause":
        run_queue.pause(runs_dir)
        print("queue paused: the current run trains on, no other starts until `queue resume`")
    elif command == "clear":
        before = len(run_queue.read_queue(runs_dir).entries)
        after = len(run_queue.clear_finished(runs_dir).entries)
        print(f"cleared {before - after} finished or failed entries")
    elif command == "eval":
        given = [f for f, v in (("--sampler", args.sampler), ("--steps", args.steps), ("--n", args.n)) if v is not None]
        if args.off:
            if given:
                raise CliError(f"--off and {', '.join(given)} do not go together")
            run_queue.set_eval(runs_dir, None)
            print("evaluation after each run: off")
        else:
            if len(given) < 3:
                raise CliError("queue eval needs --sampler, --steps and --n (or --off)")
            setting = run_queue.check_eval_setting(args.sampler, args.steps, args.n)
            run_queue.set_eval(runs_dir, setting)
            print(f"evaluation after each run: {setting.label}")
    elif command == "run":
        return _work_queue(runs_dir, args)
    return 0


def _work_queue(runs_dir: Path, args: argparse.Namespace) -> int:
    from ..work.queue_worker import QueueRunner  # the worker imports the evaluation stack: only this command needs it

    current = run_queue.read_queue(runs_dir)  # a damaged file is refused before anything starts
    if current.paused:
        raise CliError("the queue is paused: `python -m core queue resume` first" +
                       (f" ({len(current.interrupted)} stopped or interrupted)" if current.interrupted else ""))
    if not current.queued:
        print("nothing queued")
        return 0
    stamp = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)  # noqa: E731
    runner = QueueRunner(runs_dir, data_root=args.data_root, exit_when_idle=True, eval_device=args.device,
                         on_event=stamp)
    runner.start()
    stopping = False
    with StopOnSignals() as stop:
        while runner.alive:
            runner.join(0.2)
            if stop.event.is_set() and not stopping:
                stopping = True
                runner.stop()  # the current run checkpoints and ends `stopped`; the queue pauses
        runner.join()
    if runner.traceback:
        error = runner.snapshot().error or "the queue worker failed"
        raise RunError(error)
    final = run_queue.read_queue(runs_dir)
    counts = {s: sum(e.state == s for e in final.entries) for s in run_queue.STATES}
    print("queue " + ("paused" if final.paused else "done") + ": " +
          ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return EXIT_SIGNAL[stop.signal] if stop.signal is not None else 0

