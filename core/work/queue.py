"""The run queue: `queue.json` in the runs folder, so it survives a server restart and every tab,
the dashboard and the CLI share it.

    {"format_version": 1, "paused": false, "eval": null | {"sampler", "steps", "n"},
     "entries": [{"id", "run", "state", "added_at", "started_at", "ended_at", "error"}, ...]}

States: queued, running, finished, failed, stopped, interrupted. Entries train in list order (the
first queued one next); the others stay as history until `clear_finished`.

Two hidden lock files sit next to it (run listings skip dot-names):
    .queue.lock         an flock held for the few milliseconds of each read-modify-write, so edits
                        from threads and processes never lose one another's change;
    .queue.worker.lock  an flock held by the process training a queue entry, from `claim_next` until
                        `finish`. The kernel drops it when that process dies, so a `running` entry
                        whose worker lock is free was interrupted: `recover` marks it so and pauses.
                        It also makes "one queue entry trains at a time" hold across processes.

The file is read with a size bound, never through a symlink, and checked field by field. A damaged
file raises `QueueDamaged` naming the file, what is wrong and what to do; no operation writes over
it, so the user's bytes stay as they were until they fix or delete the file.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..store import runs
from ..config import ConfigError, SampleConfig, check_run_name
from ..errors import RunError
from ..store.io import MAX_JSON_BYTES, atomic_write_text, parse_json, read_bounded_bytes

QUEUE_FILE = runs.QUEUE_FILE
EDIT_LOCK = ".queue.lock"
WORKER_LOCK = ".queue.worker.lock"
FORMAT_VERSION = 1
STATES = ("queued", "running", "finished", "failed", "stopped", "interrupted")
DONE_STATES = ("finished", "failed")          # what clear_finished removes
RESUMABLE = ("stopped", "interrupted")        # what resume puts back in line
MAX_ENTRIES = 1000
MAX_ERROR_CHARS = 2000
ENTRY_KEYS = ("id", "run", "state", "added_at", "started_at", "ended_at", "error")
EVAL_KEYS = ("sampler", "steps", "n")
ID_PATTERN = re.compile(r"^[0-9a-f]{8}$")
INTERRUPTED_MESSAGE = ("the process working the queue ended while this run trained (the server was stopped "
                       "or killed); the queue is paused: resume it to continue this run from its checkpoint")


class QueueDamaged(RunError):
    """queue.json cannot be read as a queue; the message names the file, the damage and the remedy."""


class QueueError(RunError):
    """A queue operation that does not apply (unknown id, run already queued, ...): one clear line."""


@dataclass(frozen=True)
class Entry:
    id: str
    run: str
    state: str
    added_at: float
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ENTRY_KEYS}


@dataclass(frozen=True)
class EvalSetting:
    """Evaluate every run the queue finishes at this sampler setting (the entry goes into eval.json)."""
    sampler: str
    steps: int
    n: int

    def sample_config(self) -> SampleConfig:
        return SampleConfig(sampler=self.sampler, steps=self.steps, n=self.n, seed=0)

    def to_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "n": self.n}

    @property
    def label(self) -> str:
        return f"{self.sample_config().setting}, N = {self.n}"


@dataclass(frozen=True)
class Queue:
    paused: bool = False
    eval: EvalSetting | None = None
    entries: tuple[Entry, ...] = ()

    @property
    def queued(self) -> list[Entry]:
        """The waiting line, in the order the entries will train."""
        return [e for e in self.entries if e.state == "queued"]

    @property
    def running(self) -> Entry | None:
        return next((e for e in self.entries if e.state == "running"), None)

    @property
    def interrupted(self) -> list[Entry]:
        return [e for e in self.entries if e.state in RESUMABLE]

    def entry(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise QueueError(f"no queue entry with id {entry_id!r}; `python -m core queue list` shows the ids")

    def position(self, entry_id: str) -> int | None:
        """1-based place in the waiting line, None when the entry is not queued."""
        ids = [e.id for e in self.queued]
        return ids.index(entry_id) + 1 if entry_id in ids else None

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, "paused": self.paused,
                           "eval": self.eval.to_dict() if self.eval else None,
                           "entries": [e.to_dict() for e in self.entries]}, indent=2)


# -- paths and locks -----------------------------------------------------------------------------------
def queue_path(runs_dir: str | os.PathLike) -> Path:
    return Path(runs_dir) / QUEUE_FILE


def _open_lock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise QueueDamaged(f"queue lock {path} cannot be opened ({exc.strerror}); delete it if it is not a "
                           "regular file, then retry") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QueueDamaged(f"queue lock {path} is not a regular file; delete it, then retry")
    return fd


@contextmanager
def _edit_lock(runs_dir: Path) -> Iterator[None]:
    """Serialise a read-modify-write of queue.json across threads and processes (a blocking flock on
    a file descriptor of its own, so two threads of one process exclude each other too)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(runs_dir / EDIT_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class WorkerLock:
    """The flock a queue worker holds while an entry of the queue is claimed (see the module text)."""

    def __init__(self, runs_dir: Path):
        self.path = Path(runs_dir) / WORKER_LOCK
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = _open_lock(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def worker_active(runs_dir: str | os.PathLike) -> bool:
    """Whether some queue worker (this process or another) holds the worker lock now."""
    return runs.lock_file_held(Path(runs_dir) / WORKER_LOCK)


# -- reading and validating ----------------------------------------------------------------------------
def _damaged(path: Path, what: str) -> QueueDamaged:
    return QueueDamaged(f"queue file {path} is damaged: {what}. It was left as it is: fix it, or delete it "
                        "to start an empty queue")


def _time(path: Path, where: str, value: Any, optional: bool) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _damaged(path, f"{where} is {str(value)[:40]!r}, not a time in seconds")
    return float(value)


def _entry(path: Path, index: int, raw: Any) -> Entry:
    where = f"entry {index + 1}"
    if not isinstance(raw, dict):
        raise _damaged(path, f"{where} is not an object")
    if set(raw) != set(ENTRY_KEYS):
        missing, extra = sorted(set(ENTRY_KEYS) - set(raw)), sorted(set(raw) - set(ENTRY_KEYS))
        raise _damaged(path, f"{where} " + (f"lacks {', '.join(missing)}" if missing else
                                            f"has unknown keys {', '.join(extra)[:80]}"))
    if not isinstance(raw["id"], str) or not ID_PATTERN.match(raw["id"]):
        raise _damaged(path, f"{where} has id {str(raw['id'])[:40]!r}, not 8 hex digits")
    if not isinstance(raw["run"], str):
        raise _damaged(path, f"{where} has a run name that is not text")
    try:
        check_run_name(raw["run"])
    except ConfigError as exc:
        raise _damaged(path, f"{where}: {exc}") from None
    if raw["state"] not in STATES:
        raise _damaged(path, f"{where} has the unknown state {str(raw['state'])[:40]!r} "
                             f"(one of {', '.join(STATES)})")
    error = raw["error"]
    if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR_CHARS):
        raise _damaged(path, f"{where} has an error that is not text of at most {MAX_ERROR_CHARS} characters")
    return Entry(raw["id"], raw["run"], raw["state"], _time(path, f"{where} added_at", raw["added_at"], False),
                 _time(path, f"{where} started_at", raw["started_at"], True),
                 _time(path, f"{where} ended_at", raw["ended_at"], True), error)


def _eval_setting(path: Path, raw: Any) -> EvalSetting | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != set(EVAL_KEYS):
        raise _damaged(path, 'eval is not null or an object with exactly "sampler", "steps" and "n"')
    try:
        return check_eval_setting(raw["sampler"], raw["steps"], raw["n"])
    except ConfigError as exc:
        raise _damaged(path, f"eval: {exc}") from None


def parse_queue(data: bytes, path: Path) -> Queue:
    try:
        raw = parse_json(data, path.name, "queue")
    except RunError as exc:
        raise _damaged(path, str(exc).removeprefix("run 'queue': ")) from None
    if not isinstance(raw, dict):
        raise _damaged(path, "it is not a JSON object")
    expected = {"format_version", "paused", "eval", "entries"}
    if set(raw) != expected:
        missing, extra = sorted(expected - set(raw)), sorted(set(raw) - expected)
        raise _damaged(path, f"it lacks {', '.join(missing)}" if missing else
                       f"it has unknown keys {', '.join(extra)[:80]}")
    if raw["format_version"] != FORMAT_VERSION or isinstance(raw["format_version"], bool):
        raise _damaged(path, f"format_version is {str(raw['format_version'])[:20]!r}; this version reads "
                             f"{FORMAT_VERSION}")
    if not isinstance(raw["paused"], bool):
        raise _damaged(path, "paused is not true or false")
    if not isinstance(raw["entries"], list):
        raise _damaged(path, "entries is not a list")
    if len(raw["entries"]) > MAX_ENTRIES:
        raise _damaged(path, f"it holds {len(raw['entries'])} entries, over the {MAX_ENTRIES} a queue may hold")
    entries = tuple(_entry(path, i, e) for i, e in enumerate(raw["entries"]))
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise _damaged(path, "two entries share an id")
    if sum(e.state == "running" for e in entries) > 1:
        raise _damaged(path, "more than one entry is running")
    return Queue(raw["paused"], _eval_setting(path, raw["eval"]), entries)


def read_queue(runs_dir: str | os.PathLike) -> Queue:
    """The queue (empty when queue.json does not exist yet); QueueDamaged when it cannot be trusted."""
    path = queue_path(runs_dir)
    try:
        data = read_bounded_bytes(path, MAX_JSON_BYTES, "queue", missing_ok=True)
    except RunError as exc:
        raise _damaged(path, str(exc).removeprefix("run 'queue': ")) from None
    return Queue() if data is None else parse_queue(data, path)


def _edit(runs_dir: str | os.PathLike, change: Callable[[Queue], Queue]) -> Queue:
    """Read, change and write the queue under the edit lock. A damaged file raises before any write."""
    runs_dir = Path(runs_dir)
    with _edit_lock(runs_dir):
        before = read_queue(runs_dir)
        # Every edit first marks a dead worker's `running` entry interrupted: otherwise a worker
        # killed on the last entry leaves it running for good (add, remove and resume refuse it).
        after = change(_recovered(before, runs_dir))
        if after != before:
            atomic_write_text(queue_path(runs_dir), after.to_json())
        return after


def _now() -> float:
    return time.time()


def _new_id(queue: Queue) -> str:
    taken = {e.id for e in queue.entries}
    while True:
        candidate = secrets.token_hex(4)
        if candidate not in taken:
            return candidate


def _replace_entry(queue: Queue, entry: Entry) -> Queue:
    return replace(queue, entries=tuple(entry if e.id == entry.id else e for e in queue.entries))


# -- operations ----------------------------------------------------------------------------------------
def check_eval_setting(sampler: Any, steps: Any, n: Any) -> EvalSetting:
    """An eval setting checked as `SampleConfig` checks it (ConfigError names the bad value)."""
    config = SampleConfig(sampler=sampler, steps=steps, n=n)
    if config.n < 2:  # as `eval` and `sweep` refuse it: every evaluation of the queue would fail
        raise ConfigError(f"n = {n!r} is not allowed: a Fréchet distance needs at least 2 samples")
    if config.sampler == "ddpm" and config.steps:
        raise ConfigError(f"steps = {steps!r} is not allowed: DDPM runs every step; give 0 (= T)")
    return EvalSetting(config.sampler, config.steps, config.n)


def add(runs_dir: str | os.PathLike, names: Sequence[str]) -> list[Entry]:
    """Queue runs by name (each run folder must exist); all or none are added. A run already waiting
    or training in the queue is refused, so it cannot train twice."""
    runs_dir = Path(runs_dir)
    names = list(names)
    if not names:
        raise QueueError("no run to queue: give at least one run name")
    for name in names:
        path = runs.run_path(runs_dir, name)
        if not runs.is_run_folder(path, runs_dir):
            raise QueueError(f"run {name!r}: no such run folder in {runs_dir}; create it first (python -m core "
                             "train ... --queue, or Add to queue on the Train page)")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise QueueError(f"run {twice!r} is named twice; a run is queued once")
    added: list[Entry] = []

    def change(queue: Queue) -> Queue:
        active = {e.run: e for e in queue.entries if e.state in ("queued", "running")}
        for name in names:
            if name in active:
                raise QueueError(f"run {name!r} is already {active[name].state} in the queue "
                                 f"(entry {active[name].id}); a run is queued once")
        if len(queue.entries) + len(names) > MAX_ENTRIES:
            raise QueueError(f"the queue holds {len(queue.entries)} entries, the most is {MAX_ENTRIES}: "
                             "clear the finished ones first")
        new = list(queue.entries)
        for name in names:
            entry = Entry(_new_id(replace(queue, entries=tuple(new))), name, "queued", _now())
            new.append(entry)
            added.append(entry)
        return replace(queue, entries=tuple(new))

    _edit(runs_dir, change)
    return added


def remove(runs_dir: str | os.PathLike, entry_id: str) -> Entry:
    """Take an entry off the queue (any state but running: a running one is stopped instead)."""
    removed: list[Entry] = []

    def change(queue: Queue) -> Queue:
        entry = queue.entry(entry_id)
        if entry.state == "running":
            raise QueueError(f"entry {entry_id} (run {entry.run!r}) is training: stop it first, then remove it")
        removed.append(entry)
        return replace(queue, entries=tuple(e for e in queue.entries if e.id != entry_id))

    _edit(runs_dir, change)
    return removed[0]


def move(runs_dir: str | os.PathLike, entry_id: str, to: int) -> Queue:
    """Put a queued entry at 1-based place `to` of the waiting line (clamped to the line's ends
    by `up`/`down`; an explicit place outside it is refused)."""

    def change(queue: Queue) -> Queue:
        entry = queue.entry(entry_id)
        if entry.state != "queued":
            raise QueueError(f"entry {entry_id} (run {entry.run!r}) is {entry.state}: only queued entries move")
        line = queue.queued
        if isinstance(to, bool) or not isinstance(to, int) or not 1 <= to <= len(line):
            raise QueueError(f"position {to!r} is not allowed: the waiting line has places 1 to {len(line)}")
        order = [e for e in line if e.id != entry_id]
        order.insert(to - 1, entry)
        # The queued entries take the slots queued entries held, in the new order; the rest stay put.
        it = iter(order)
        return replace(queue, entries=tuple(next(it) if e.state == "queued" else e for e in queue.entries))

    return _edit(runs_dir, change)


def up(runs_dir: str | os.PathLike, entry_id: str) -> Queue:
    position = read_queue(runs_dir).position(entry_id)
    if position is None:
        raise QueueError(f"entry {entry_id} is not waiting in the queue")
    return move(runs_dir, entry_id, max(1, position - 1))


def down(runs_dir: str | os.PathLike, entry_id: str) -> Queue:
    queue = read_queue(runs_dir)
    position = queue.position(entry_id)
    if position is None:
        raise QueueError(f"entry {entry_id} is not waiting in the queue")
    return move(runs_dir, entry_id, min(len(queue.queued), position + 1))


def set_eval(runs_dir: str | os.PathLike, setting: EvalSetting | None) -> Queue:
    """Evaluate each run the queue finishes at `setting` from now on (None: no evaluation)."""
    if setting is not None:
        setting = check_eval_setting(setting.sampler, setting.steps, setting.n)
    return _edit(runs_dir, lambda queue: replace(queue, eval=setting))


def resume(runs_dir: str | os.PathLike) -> Queue:
    """Put stopped and interrupted entries back at the head of the line (in their order) and unpause."""

    def change(queue: Queue) -> Queue:
        back = [replace(e, state="queued", started_at=None, ended_at=None, error=None)
                for e in queue.entries if e.state in RESUMABLE]
        rest = [e for e in queue.entries if e.state not in RESUMABLE]
        # history (finished, failed, running) first, then the resumed entries, then the waiting line
        done = [e for e in rest if e.state != "queued"]
        waiting = [e for e in rest if e.state == "queued"]
        return replace(queue, paused=False, entries=tuple(done + back + waiting))

    return _edit(runs_dir, change)


def pause(runs_dir: str | os.PathLike) -> Queue:
    """Let the current run finish, then start no other until `resume`."""
    return _edit(runs_dir, lambda queue: replace(queue, paused=True))


def clear_finished(runs_dir: str | os.PathLike) -> Queue:
    """Drop the finished and failed entries (the runs themselves stay)."""
    return _edit(runs_dir, lambda q: replace(q, entries=tuple(e for e in q.entries if e.state not in DONE_STATES)))


def _recovered(queue: Queue, runs_dir: Path) -> Queue:
    running = queue.running
    if running is None or worker_active(runs_dir):
        return queue
    entry = replace(running, state="interrupted", ended_at=_now(), error=INTERRUPTED_MESSAGE)
    return replace(_replace_entry(queue, entry), paused=True)


def recover_view(runs_dir: str | os.PathLike) -> Queue:
    """The queue as `recover` would leave it, without writing (for listings)."""
    return _recovered(read_queue(runs_dir), Path(runs_dir))


def recover(runs_dir: str | os.PathLike) -> Queue:
    """A `running` entry that no live worker holds was interrupted (its process died): mark it so and
    pause the queue, so the user decides when to go on. Only writes when that is the case."""
    runs_dir = Path(runs_dir)
    if not queue_path(runs_dir).exists():
        return read_queue(runs_dir)  # nothing to recover; also never creates the folder or lock
    return _edit(runs_dir, lambda queue: _recovered(queue, runs_dir))


@dataclass
class Claim:
    """An entry this process now trains; holds the worker lock until `finish` releases it."""
    entry: Entry
    run_dir: Path
    eval: EvalSetting | None
    lock: WorkerLock

    def release(self) -> None:
        self.lock.release()


def claim_next(runs_dir: str | os.PathLike) -> Claim | None:
    """Under the edit lock: when the queue is not paused, no entry is running and no other worker is
    busy, mark the first queued entry running and return it (with the worker lock held); else None."""
    runs_dir = Path(runs_dir)
    if not queue_path(runs_dir).exists():
        return None
    lock = WorkerLock(runs_dir)
    claimed: list[Claim] = []

    def change(queue: Queue) -> Queue:
        queue = _recovered(queue, runs_dir)  # a dead worker's entry is never left `running`
        if queue.paused or queue.running is not None or not queue.queued:
            return queue
        if not lock.try_acquire():
            return queue  # another worker is between finishing its entry and releasing the lock
        entry = replace(queue.queued[0], state="running", started_at=_now(), ended_at=None, error=None)
        claimed.append(Claim(entry, runs_dir / entry.run, queue.eval, lock))
        return _replace_entry(queue, entry)

    try:
        _edit(runs_dir, change)
    except BaseException:
        lock.release()
        raise
    return claimed[0] if claimed else None


def finish(runs_dir: str | os.PathLike, claim_or_id: Claim | str, state: str, error: str | None = None,
           *, pause_queue: bool = False) -> Queue:
    """Record how a claimed entry ended (finished, failed or stopped) and release the worker lock.
    An entry removed from the file meanwhile (the user deleted the file) is simply not recorded."""
    if state not in ("finished", "failed", "stopped", "interrupted"):
        raise ValueError(f"state = {state!r} is not an end state")
    entry_id = claim_or_id.entry.id if isinstance(claim_or_id, Claim) else claim_or_id
    error = None if error is None else error[:MAX_ERROR_CHARS]

    def change(queue: Queue) -> Queue:
        if entry_id not in {e.id for e in queue.entries}:
            return queue
        entry = replace(queue.entry(entry_id), state=state, ended_at=_now(), error=error)
        queue = _replace_entry(queue, entry)
        return replace(queue, paused=True) if pause_queue else queue

    try:
        return _edit(runs_dir, change)
    finally:
        if isinstance(claim_or_id, Claim):
            claim_or_id.release()


def describe_error(exc: BaseException) -> str:
    """One line for an entry's error field."""
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, (RunError, ConfigError)) and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return text.splitlines()[0][:MAX_ERROR_CHARS] if text else type(exc).__name__


__all__ = ["QUEUE_FILE", "STATES", "Claim", "Entry", "EvalSetting", "Queue", "QueueDamaged", "QueueError", "add",
           "check_eval_setting", "claim_next", "clear_finished", "describe_error", "down", "finish", "move",
           "pause", "queue_path", "read_queue", "recover", "recover_view", "remove", "resume", "set_eval", "up", "worker_active"]
