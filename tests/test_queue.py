"""core.queue (the queue file) and core.work.queue_worker.QueueRunner (its worker): order, moves, refusals, a damaged
file left byte-identical, recovery after a killed worker, two runs trained in turn, a failing run that
does not stop the queue, stop and resume, and the evaluation entry written when each run ends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO, tiny_config
from core.work import queue
from core.store import runs
from core.config import ConfigError
from core.work.jobs import JobBusy, JobManager
from core.work.queue_worker import QueueRunner


@pytest.fixture
def runs_dir(tmp_path):
    path = tmp_path / "runs"
    path.mkdir()
    return path


def make_runs(runs_dir, *names, **train):
    for name in names:
        runs.create_run(runs_dir, name, tiny_config(**train))


def order(runs_dir):
    return [e.run for e in queue.read_queue(runs_dir).queued]


# -- the file -----------------------------------------------------------------------------------------
def test_add_keeps_order_move_up_down_and_remove(runs_dir):
    make_runs(runs_dir, "a", "b", "c", "d")
    added = queue.add(runs_dir, ["a", "b", "c"])
    assert [e.run for e in added] == ["a", "b", "c"] and all(e.state == "queued" for e in added)
    assert order(runs_dir) == ["a", "b", "c"]
    ids = {e.run: e.id for e in added}
    queue.move(runs_dir, ids["c"], 1)
    assert order(runs_dir) == ["c", "a", "b"]
    queue.down(runs_dir, ids["c"])
    assert order(runs_dir) == ["a", "c", "b"]
    queue.up(runs_dir, ids["b"])
    assert order(runs_dir) == ["a", "b", "c"]
    queue.up(runs_dir, ids["a"])  # already first: stays
    assert order(runs_dir) == ["a", "b", "c"]
    with pytest.raises(queue.QueueError, match="places 1 to 3"):
        queue.move(runs_dir, ids["a"], 4)
    assert queue.remove(runs_dir, ids["b"]).run == "b"
    assert order(runs_dir) == ["a", "c"]
    queue.add(runs_dir, ["d"])
    assert order(runs_dir) == ["a", "c", "d"]
    assert queue.read_queue(runs_dir).position(ids["c"]) == 2
    with pytest.raises(queue.QueueError, match="no queue entry with id 'ffffffff'"):
        queue.remove(runs_dir, "ffffffff")
    # what the file holds is what the format says
    raw = json.loads(queue.queue_path(runs_dir).read_text())
    assert raw["format_version"] == 1 and raw["paused"] is False and raw["eval"] is None
    assert set(raw["entries"][0]) == {"id", "run", "state", "added_at", "started_at", "ended_at", "error"}


def test_refusals_change_nothing(runs_dir):
    make_runs(runs_dir, "a", "b")
    queue.add(runs_dir, ["a"])
    before = queue.queue_path(runs_dir).read_bytes()
    with pytest.raises(queue.QueueError, match="'a' is already queued"):
        queue.add(runs_dir, ["b", "a"])  # all or nothing: b is not added either
    with pytest.raises(queue.QueueError, match="no such run folder"):
        queue.add(runs_dir, ["nope"])
    with pytest.raises(ConfigError, match="not allowed"):
        queue.add(runs_dir, ["../escape"])
    with pytest.raises(queue.QueueError, match="named twice"):
        queue.add(runs_dir, ["b", "b"])
    with pytest.raises(ConfigError, match="sampler"):
        queue.set_eval(runs_dir, queue.EvalSetting("nope", 5, 32))
    assert queue.queue_path(runs_dir).read_bytes() == before
    claim = queue.claim_next(runs_dir)
    try:
        with pytest.raises(queue.QueueError, match="stop it first"):
            queue.remove(runs_dir, claim.entry.id)
        with pytest.raises(queue.QueueError, match="already running"):
            queue.add(runs_dir, ["a"])
    finally:
        queue.finish(runs_dir, claim, "finished")
    queue.add(runs_dir, ["a"])  # a finished run may be queued again (it trains longer if its limit was raised)


def test_the_queue_file_never_lists_as_a_run(runs_dir):
    make_runs(runs_dir, "a")
    queue.add(runs_dir, ["a"])
    assert [i.name for i in runs.list_runs(runs_dir)] == ["a"]


DAMAGE = {
    "bad json": b"{not json",
    "not an object": b"[]",
    "unknown state": None,  # filled in below from a valid file
    "wrong type": None,
    "too big": b" " * (2 << 20),
    "unknown key": None,
}


def _damaged_variants(valid: dict) -> dict[str, bytes]:
    variants = {k: v for k, v in DAMAGE.items() if v is not None}
    state = json.loads(json.dumps(valid))
    state["entries"][0]["state"] = "exploded"
    variants["unknown state"] = json.dumps(state).encode()
    typed = json.loads(json.dumps(valid))
    typed["paused"] = "no"
    variants["wrong type"] = json.dumps(typed).encode()
    extra = json.loads(json.dumps(valid))
    extra["entries"][0]["colour"] = "red"
    variants["unknown key"] = json.dumps(extra).encode()
    return variants


def test_a_damaged_file_is_reported_and_never_written(runs_dir, tmp_path):
    make_runs(runs_dir, "a", "b")
    entry = queue.add(runs_dir, ["a"])[0]
    valid = json.loads(queue.queue_path(runs_dir).read_text())
    mutations = [
        lambda: queue.add(runs_dir, ["b"]), lambda: queue.remove(runs_dir, entry.id),
        lambda: queue.move(runs_dir, entry.id, 1), lambda: queue.up(runs_dir, entry.id),
        lambda: queue.down(runs_dir, entry.id), lambda: queue.set_eval(runs_dir, None),
        lambda: queue.resume(runs_dir), lambda: queue.pause(runs_dir), lambda: queue.clear_finished(runs_dir),
        lambda: queue.claim_next(runs_dir), lambda: queue.finish(runs_dir, entry.id, "failed", "x"),
        lambda: queue.recover(runs_dir),
    ]
    path = queue.queue_path(runs_dir)
    for what, data in _damaged_variants(valid).items():
        path.write_bytes(data)
        with pytest.raises(queue.QueueDamaged) as info:
            queue.read_queue(runs_dir)
        message = str(info.value)
        assert str(path) in message and "fix it, or delete it" in message, (what, message)
        for mutate in mutations:
            with pytest.raises(queue.QueueDamaged):
                mutate()
            assert path.read_bytes() == data, what
    # a symlink and a folder are not a queue file either, and stay what they are
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(valid))
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(queue.QueueDamaged, match="symbolic link"):
        queue.add(runs_dir, ["b"])
    assert path.is_symlink() and json.loads(target.read_text()) == valid
    path.unlink()
    path.mkdir()
    with pytest.raises(queue.QueueDamaged, match="not a regular file"):
        queue.claim_next(runs_dir)
    assert path.is_dir()


def test_recover_marks_a_dead_workers_entry_interrupted_and_pauses(runs_dir):
    make_runs(runs_dir, "a", "b")
    queue.add(runs_dir, ["a", "b"])
    # A worker in another process claims "a", then dies without a word (a killed server).
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from core.work import queue
        claim = queue.claim_next({str(runs_dir)!r})
        print(claim.entry.run, flush=True)
        os._exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "a", done.stderr
    assert queue.read_queue(runs_dir).running.run == "a"
    recovered = queue.recover(runs_dir)
    a = recovered.entries[0]
    assert a.state == "interrupted" and "resume" in a.error and recovered.paused
    assert queue.claim_next(runs_dir) is None  # paused: nothing starts until the user resumes
    resumed = queue.resume(runs_dir)
    assert not resumed.paused and [e.run for e in resumed.queued] == ["a", "b"]
    claim = queue.claim_next(runs_dir)
    assert claim.entry.run == "a"
    assert queue.recover(runs_dir).running.run == "a"  # a live worker's entry is left alone
    queue.finish(runs_dir, claim, "finished")


def test_edits_from_many_threads_are_never_lost(runs_dir):
    names = [f"r{i}" for i in range(12)]
    make_runs(runs_dir, *names)
    threads = [threading.Thread(target=queue.add, args=(runs_dir, [n])) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(order(runs_dir)) == sorted(names)


# -- the worker ---------------------------------------------------------------------------------------
def run_queue(runs_dir, images, **kwargs) -> QueueRunner:
    runner = QueueRunner(runs_dir, images=images, exit_when_idle=True, poll_s=0.05, **kwargs).start()
    assert runner.join(300), "the queue did not finish in time"
    assert runner.traceback is None, runner.traceback
    return runner


def test_two_runs_train_in_order_and_a_failing_one_does_not_stop_the_queue(runs_dir, tiny_images):
    make_runs(runs_dir, "first", "broken", "second", max_steps=4)
    queue.add(runs_dir, ["first", "broken", "second"])
    (runs_dir / "broken" / "config.json").write_text("{damaged")
    run_queue(runs_dir, tiny_images)
    entries = {e.run: e for e in queue.read_queue(runs_dir).entries}
    assert [entries[n].state for n in ("first", "broken", "second")] == ["finished", "failed", "finished"]
    assert "config.json is not valid JSON" in entries["broken"].error
    assert entries["first"].ended_at <= entries["second"].started_at  # one at a time, in order
    for name in ("first", "second"):
        info = runs.run_info(runs_dir / name)
        assert info.state == "finished" and info.step == 4


def test_stop_pauses_the_queue_and_resume_continues_the_run(runs_dir, tiny_images):
    make_runs(runs_dir, "long", max_steps=100_000, epochs=1000)
    make_runs(runs_dir, "next", max_steps=2)
    queue.add(runs_dir, ["long", "next"])
    runner = QueueRunner(runs_dir, images=tiny_images, poll_s=0.05).start()
    try:
        deadline = time.monotonic() + 120
        while (runner.snapshot().training is None or runner.snapshot().training.step < 4) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        status = runner.snapshot()
        assert status.phase == "training" and status.entry.run == "long" and status.training.step >= 4
        assert runner.stop_current()
        while runner.training_run is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        current = queue.read_queue(runs_dir)
        assert current.paused and current.entries[0].state == "stopped"
        assert current.entries[1].state == "queued"  # the next one waits for the user
        assert runs.run_info(runs_dir / "long").state == "stopped"
        stopped_at = runs.run_info(runs_dir / "long").step
        time.sleep(0.3)
        assert queue.read_queue(runs_dir).entries[1].state == "queued"
    finally:
        runner.stop()
        assert runner.join(120)
    # Resume with a limit the run can reach: it continues from its checkpoint, then "next" trains.
    from core.store import io
    from core.config import override
    config = override(runs.load_config(runs_dir / "long"), max_steps=stopped_at + 2)
    io.atomic_write_text(runs_dir / "long" / "config.json", config.to_json())
    queue.resume(runs_dir)
    run_queue(runs_dir, tiny_images)
    states = {e.run: e.state for e in queue.read_queue(runs_dir).entries}
    assert states == {"long": "finished", "next": "finished"}
    assert runs.run_info(runs_dir / "long").step == stopped_at + 2


@pytest.mark.integration  # scores with the shipped FashionMNIST classifier against the real test split
def test_each_finished_run_is_evaluated_into_its_eval_json(runs_dir, tiny_images):
    make_runs(runs_dir, "scored", max_steps=2)
    queue.add(runs_dir, ["scored"])
    queue.set_eval(runs_dir, queue.EvalSetting("ddim", 3, 32))
    run_queue(runs_dir, tiny_images, eval_device="cpu")
    entry = queue.read_queue(runs_dir).entries[0]
    assert entry.state == "finished", entry.error
    evals = runs.read_eval(runs_dir / "scored")
    assert len(evals) == 1 and evals[0]["setting"] == "ddim-3" and evals[0]["n"] == 32


def test_the_manager_keeps_one_run_training_between_queue_and_direct_jobs(runs_dir, tiny_images):
    manager = JobManager()
    make_runs(runs_dir, "queued", max_steps=100_000, epochs=1000)
    queue.add(runs_dir, ["queued"])
    runner = manager.ensure_queue_runner(runs_dir, images=tiny_images, poll_s=0.05)
    try:
        deadline = time.monotonic() + 60
        while runner.training_run is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(JobBusy, match="the queue is training run 'queued'"):
            manager.start_new(runs_dir, "direct", tiny_config(), images=tiny_images)
        assert not (runs_dir / "direct").exists()
        assert manager.ensure_queue_runner(runs_dir) is runner  # one worker per process
        assert manager.stop_queue_run()
        while runner.training_run is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        # A direct job now; a run queued meanwhile waits for it, then trains.
        job = manager.start_new(runs_dir, "direct", tiny_config(max_steps=20), images=tiny_images)
        manager.queue_new(runs_dir, "after", tiny_config(max_steps=2))
        queue.remove(runs_dir, queue.read_queue(runs_dir).entries[0].id)  # drop the stopped one
        queue.resume(runs_dir)
        assert job.join(120)
        while queue.read_queue(runs_dir).entries[-1].state in ("queued", "running") and time.monotonic() < deadline + 60:
            time.sleep(0.05)
        after = queue.read_queue(runs_dir).entries[-1]
        assert after.run == "after" and after.state == "finished", after.error
        finished_direct = runs.read_status(runs_dir / "direct")["updated_at"]
        assert after.started_at >= finished_direct - 1.0
    finally:
        runner.stop()
        assert runner.join(120)


def test_queue_new_refuses_a_damaged_queue_before_creating_the_run(runs_dir):
    queue.queue_path(runs_dir).write_bytes(b"{broken")
    with pytest.raises(queue.QueueDamaged):
        JobManager().queue_new(runs_dir, "fresh", tiny_config())
    assert not (runs_dir / "fresh").exists()
    assert queue.queue_path(runs_dir).read_bytes() == b"{broken"
    assert os.listdir(runs_dir) == ["queue.json"] or set(os.listdir(runs_dir)) <= {"queue.json", ".queue.lock"}


# -- the command line ---------------------------------------------------------------------------------
def cli(capsys, *argv):
    from core.cli.main import main
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_list_move_remove_eval_and_every_bad_input(runs_dir, capsys):
    make_runs(runs_dir, "a", "b", "c")
    d = ("--runs-dir", str(runs_dir))
    code, out, _ = cli(capsys, "queue", "add", "a", "b", "c", *d)
    assert code == 0 and "queued a (entry" in out
    code, out, _ = cli(capsys, "queue", "list", "--json", *d)
    listing = json.loads(out)
    ids = [e["id"] for e in listing["entries"]]
    assert [e["position"] for e in listing["entries"]] == [1, 2, 3]
    assert cli(capsys, "queue", "move", ids[2], "--to", "1", *d)[0] == 0
    assert order(runs_dir) == ["c", "a", "b"]
    assert cli(capsys, "queue", "remove", ids[0], *d)[0] == 0
    assert order(runs_dir) == ["c", "b"]
    code, out, _ = cli(capsys, "queue", "eval", "--sampler", "ddim", "--steps", "5", "--n", "32", *d)
    assert code == 0 and queue.read_queue(runs_dir).eval == queue.EvalSetting("ddim", 5, 32)
    code, out, _ = cli(capsys, "queue", "list", *d)
    assert "ddim-5, N = 32" in out and "  1 " + ids[2] in out and "c" in out

    before = queue.queue_path(runs_dir).read_bytes()
    bad = [
        (("queue", "remove", "ffffffff"), "no queue entry with id 'ffffffff'"),
        (("queue", "move", ids[1], "--to", "9"), "places 1 to 2"),
        (("queue", "add", "ghost"), "no such run folder"),
        (("queue", "add", "c"), "already queued"),
        (("queue", "eval", "--sampler", "ddpm", "--steps", "5", "--n", "32"), "DDPM runs every step"),
        (("queue", "eval", "--sampler", "ddim", "--steps", "5", "--n", "0"), "n = 0 is not allowed"),
        (("queue", "eval", "--sampler", "ddim"), "needs --sampler, --steps and --n"),
        (("queue", "eval", "--off", "--n", "3"), "do not go together"),
    ]
    for argv, message in bad:
        code, out, err = cli(capsys, *argv, *d)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert queue.queue_path(runs_dir).read_bytes() == before
    code, _, err = cli(capsys, "train", "--preset", "tiny", "--name", "c", "--queue", *d)
    assert code == 2 and "exists" in err
    assert cli(capsys, "queue", "eval", "--off", *d)[0] == 0
    assert queue.read_queue(runs_dir).eval is None

    # A damaged file: every command says so in one line, exit 2, and the bytes stay.
    queue.queue_path(runs_dir).write_bytes(b'{"format_version": 1, "paused": 3}')
    damaged = queue.queue_path(runs_dir).read_bytes()
    for argv in (("queue", "list"), ("queue", "add", "a"), ("queue", "remove", ids[1]), ("queue", "resume"),
                 ("queue", "move", ids[1], "--to", "1"), ("queue", "eval", "--off"), ("queue", "run"),
                 ("train", "--preset", "tiny", "--name", "new", "--queue")):
        code, _, err = cli(capsys, *argv, *d)
        assert code == 2 and "is damaged" in err and "delete it" in err, (argv, err)
        assert queue.queue_path(runs_dir).read_bytes() == damaged
    assert not (runs_dir / "new").exists()


def core_cli(*args, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDPM_DATA_ROOT": str(REPO / "data")}
    return subprocess.Popen([sys.executable, "-m", "core", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.integration  # trains on the real dataset's first 512 images
def test_cli_train_queue_then_queue_run_and_ctrl_c_leaves_the_run_stopped(runs_dir):
    import signal

    d = ("--runs-dir", str(runs_dir))
    tiny = ("train", "--preset", "tiny", "--quiet", *d)
    for name, steps in (("q1", "3"), ("q2", "3")):
        made = core_cli(*tiny, "--max-steps", steps, "--name", name, "--queue")
        out, err = made.communicate(timeout=120)
        assert made.returncode == 0 and f"queued: {runs_dir / name}" in out, err
        assert runs.run_info(runs_dir / name).state == "created"
    worked = core_cli("queue", "run", *d)
    out, err = worked.communicate(timeout=300)
    assert worked.returncode == 0, err
    assert "training q1" in out and "finished q2" in out and "queue done: 2 finished" in out
    q1, q2 = queue.read_queue(runs_dir).entries
    assert q1.ended_at <= q2.started_at and runs.run_info(runs_dir / "q2").step == 3

    made = core_cli(*tiny, "--max-steps", "100000", "--epochs", "1000", "--name", "long", "--queue")
    assert made.wait(120) == 0
    worked = core_cli("queue", "run", *d)
    deadline = time.monotonic() + 120
    while not (runs_dir / "long" / "metrics.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the training loop has started
    worked.send_signal(signal.SIGINT)
    out, err = worked.communicate(timeout=120)
    assert worked.returncode == 130, err
    current = queue.read_queue(runs_dir)
    assert current.paused and current.entries[-1].state == "stopped"
    assert runs.run_info(runs_dir / "long").state == "stopped"
    assert "queue paused" in out


@pytest.mark.integration  # trains on the real dataset's first 512 images
def test_a_killed_worker_leaves_the_run_interrupted_and_the_queue_waits_for_resume(runs_dir):
    import signal

    d = ("--runs-dir", str(runs_dir))
    made = core_cli("train", "--preset", "tiny", "--quiet", "--max-steps", "100000", "--epochs", "1000",
                    "--checkpoint-every", "1", "--name", "killed", "--queue", *d)
    assert made.wait(120) == 0
    made = core_cli("train", "--preset", "tiny", "--quiet", "--max-steps", "2", "--name", "waiting", "--queue", *d)
    assert made.wait(120) == 0
    worker = core_cli("queue", "run", *d)
    deadline = time.monotonic() + 120
    while not (runs_dir / "killed" / "checkpoint.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.send_signal(signal.SIGKILL)  # a killed server: no clean-up of any kind
    worker.communicate(timeout=60)
    current = queue.recover(runs_dir)  # what the dashboard (or the next `queue run`) does first
    killed, waiting = current.entries
    assert killed.state == "interrupted" and current.paused and waiting.state == "queued"
    assert runs.run_info(runs_dir / "killed").state == "interrupted"
    listed = core_cli("queue", "run", *d)
    out, err = listed.communicate(timeout=60)
    assert listed.returncode == 2 and "paused" in err  # it waits for the user
    assert queue.read_queue(runs_dir).entries[1].state == "queued"
    assert queue.resume(runs_dir).queued[0].run == "killed"
