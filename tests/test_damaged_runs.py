"""Damaged run folders: a clear error for that run alone, every other run still lists and loads.

Each case copies a tiny finished run with EMA (conftest's `trained_tiny_run`, trained once per
session to spare the CPU) into a runs folder next to an intact copy, damages one file of the copy
the way a crash, a bad disk or a hand edit would, and
checks the Python API (`core.runs.load_model` -> RunError naming the run and the file; `list_runs`
still lists both). One test then drives the same cases through `python -m core sample --run`
(exit 2, one line) and `python -m core runs`, in this process (conftest's run_core).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from core.store import runs
from core.config import FORMAT_VERSION
from tests.conftest import copy_run, run_core


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, trained_tiny_run) -> Path:
    """conftest's `tiny_run`, one copy for the module: every case below works on copies of it."""
    return copy_run(trained_tiny_run, tmp_path_factory.mktemp("base") / "runs")


def _truncate(name: str):
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])  # a copy cut short by a full disk or a kill
    return damage


def _garble_header(name: str):
    def damage(run: Path) -> None:
        data = bytearray((run / name).read_bytes())
        data[8:72] = b"\x07" * 64  # the JSON header that describes every tensor, overwritten
        (run / name).write_bytes(bytes(data))
    return damage


def _without_ema(damage):
    def both(run: Path) -> None:
        (run / "ema.safetensors").unlink()  # the raw weights are then the ones loaded
        damage(run)
    return both


def _edit_config(edit):
    def damage(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        edit(config)
        (run / "config.json").write_text(json.dumps(config))
    return damage


def _empty(run: Path) -> None:
    shutil.rmtree(run)
    run.mkdir()


DAMAGE = [
    # (id, how to damage the copy, substrings of the RunError: the run, the file, what is wrong)
    ("truncated-model", _without_ema(_truncate("model.safetensors")),
     ["model.safetensors is damaged or truncated"]),
    ("corrupt-model", _without_ema(_garble_header("model.safetensors")),
     ["model.safetensors is damaged or truncated"]),
    ("truncated-ema", _truncate("ema.safetensors"), ["ema.safetensors is damaged or truncated"]),
    ("config-not-json", lambda run: (run / "config.json").write_text('{"model": {"name": "unet",'),
     ["config.json is not valid JSON"]),
    ("config-not-text", lambda run: (run / "config.json").write_bytes(b"\xff\xfe\x00\x81"),
     ["config.json is not text"]),
    # Without the check, a missing T silently rebuilt the default T = 1000 for a T = 20 model.
    ("config-misses-field", _edit_config(lambda c: c["schedule"].pop("timesteps")),
     ["config section 'schedule' misses the fields: timesteps"]),
    ("config-misses-section", _edit_config(lambda c: c.pop("model")), ["config misses the section 'model'"]),
    ("config-wrong-type", _edit_config(lambda c: c["model"].update(channel_mults=None)),
     ["channel_mults = None is not allowed"]),
    ("newer-format", _edit_config(lambda c: c.update(format_version=FORMAT_VERSION + 1)),
     [f"format_version = {FORMAT_VERSION + 1} is not allowed", "newer version"]),
    ("weights-do-not-fit", _edit_config(lambda c: c["model"].update(base_channels=16)),
     ["does not fit the model in config.json", "size mismatch"]),
    ("empty-folder", _empty, ["config.json is missing"]),
]


def _pair(tiny_run: Path, damage) -> tuple[Path, Path]:
    """An intact copy and a damaged copy of the tiny run, alone in a fresh runs folder."""
    root = Path(tempfile.mkdtemp(dir=tiny_run.parent.parent, prefix="pair-"))
    healthy, broken = root / "healthy", root / "broken"
    shutil.copytree(tiny_run, healthy)
    shutil.copytree(tiny_run, broken)
    damage(broken)
    return healthy, broken


@pytest.mark.parametrize("damage, expected", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damage_is_a_clear_error_for_that_run_only(tiny_run, damage, expected):
    healthy, broken = _pair(tiny_run, damage)
    with pytest.raises(runs.RunError) as info:
        runs.load_model(broken)
    message = str(info.value)
    assert message.startswith("run 'broken': ") and "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} missing from {message!r}"

    listed = {info.name: info for info in runs.list_runs(healthy.parent)}
    assert set(listed) == {"healthy", "broken"}
    assert listed["healthy"].state == "finished" and listed["healthy"].error is None
    if listed["broken"].config is None:  # what the list can tell without loading weights
        assert listed["broken"].state == "damaged" and listed["broken"].error == message
    loaded = runs.load_model(healthy)
    assert loaded.used_ema and loaded.config.schedule.timesteps == 20


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


# Files the list reads besides config.json: damage there must not take the whole list down.
LIST_DAMAGE = [
    ("metrics-garbled", lambda run: (run / "metrics.csv").write_bytes(b"step,epoch\n\xff\xfe\x00\x80garbage\n")),
    ("metrics-torn-row", lambda run: _append(run / "metrics.csv", "8,1,0.2")),  # killed mid-write
    ("state-not-an-object", lambda run: (run / "state.json").write_text("[6, 1]")),
    ("state-bad-step", lambda run: (run / "state.json").write_text('{"step": "six", "meta": [1]}')),
    ("status-bad-heartbeat", lambda run: (run / "status.json").write_text(
        '{"state": "running", "pid": 1, "updated_at": "soon"}')),
    ("status-unknown-state", lambda run: (run / "status.json").write_text('{"state": 42}')),
    ("status-not-json", lambda run: (run / "status.json").write_bytes(b"\x00\x01")),
]


@pytest.mark.parametrize("damage", [d[1] for d in LIST_DAMAGE], ids=[d[0] for d in LIST_DAMAGE])
def test_damage_beside_the_config_never_breaks_the_list(tiny_run, damage):
    healthy, broken = _pair(tiny_run, damage)
    listed = {info.name: info for info in runs.list_runs(healthy.parent)}
    assert set(listed) == {"healthy", "broken"}
    assert listed["healthy"].state == "finished" and listed["healthy"].step == 6
    assert listed["broken"].state in runs.STATES + ("damaged",)
    assert isinstance(listed["broken"].step, int) and isinstance(listed["broken"].meta, dict)
    assert [int(r["step"]) for r in runs.read_metrics(broken)] in ([2, 4, 6], [])  # torn rows skipped
    runs.load_model(broken)  # the weights are intact, so the run still opens


def test_cli_sample_and_runs_on_damaged_runs(tiny_run):
    root = tiny_run.parent.parent / "zoo"
    shutil.copytree(tiny_run, root / "healthy")
    for case_id, damage, _ in DAMAGE:
        shutil.copytree(tiny_run, root / case_id)
        damage(root / case_id)
    commands = [["sample", "--run", str(root / case_id), "--device", "cpu", "--quiet", "--n", "2",
                 "--sampler", "ddim", "--steps", "2", "--out", str(root / f"{case_id}.png")]
                for case_id, _, _ in DAMAGE]
    commands.append(["runs", "--runs-dir", str(root), "--json"])
    commands.append(["sample", "--run", str(root / "healthy"), "--device", "cpu", "--quiet", "--n", "2",
                     "--sampler", "ddim", "--steps", "2", "--out", str(root / "healthy.png")])
    results = [run_core(*command) for command in commands]

    for (case_id, _, expected), proc in zip(DAMAGE, results):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, f"{case_id}: {proc.stderr}"
        assert len(lines) == 1 and lines[0].startswith(f"error: run '{case_id}': "), f"{case_id}: {proc.stderr}"
        assert all(part in lines[0] for part in expected), f"{case_id}: {lines[0]}"
        assert not (root / f"{case_id}.png").exists()

    listing = results[-2]
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert set(rows) == {"healthy"} | {case_id for case_id, _, _ in DAMAGE}
    assert rows["healthy"]["state"] == "finished" and rows["healthy"]["error"] is None
    for case_id in ("config-not-json", "config-misses-field", "newer-format", "empty-folder"):
        assert rows[case_id]["state"] == "damaged" and rows[case_id]["error"].startswith(f"run '{case_id}'")

    healthy = results[-1]
    assert healthy.returncode == 0, healthy.stderr
    assert (root / "healthy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
