"""Security: nothing is unpickled, the dashboard binds to this machine only, and names typed by a
user can never reach outside the runs folder.

A run folder may come from someone else (a shared bundle, a download), so loading one must never
execute code: weights and optimizer state are safetensors, everything else JSON or CSV.
"""
from __future__ import annotations

import ast
import os
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from core.store import io, runs
from core.config import ConfigError, override
from core.models import build_model
from core.train.training import build_optimizer, train_run
from tests.conftest import REPO, tiny_config

SCANNED = ("core", "dashboard")
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# -- no pickle anywhere ----------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loading(source: str, filename: str = "<source>") -> list[str]:
    """Every way `source` could unpickle: pickle-family imports, torch.load without weights_only=True,
    torch.save (its files need torch.load), numpy.load with allow_pickle=True, pandas.read_pickle."""
    tree = ast.parse(source, filename)
    found = []
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in UNPICKLING_MODULES:
                found.append(f"{where} from {node.module} import ...")
            if module == "torch" and any(a.name in ("load", "save") for a in node.names):
                found.append(f"{where} from torch import load/save")
        elif isinstance(node, (ast.Attribute, ast.Name)):
            name = _dotted(node)
            call = calls.get(id(node))
            if name in ("torch.load", "torch.serialization.load"):
                if call is None or not _keyword_is(call, "weights_only", True):
                    found.append(f"{where} {name} without weights_only=True")
            elif name in ("torch.save", "torch.serialization.save", "pd.read_pickle", "pandas.read_pickle"):
                found.append(f"{where} {name}")
            elif name in ("np.load", "numpy.load") and call is not None and _keyword_is(call, "allow_pickle", True):
                found.append(f"{where} {name} with allow_pickle=True")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import dill as d",
    "from pickle import loads",
    "import torch\nstate = torch.load('m.pt')",
    "import torch\nstate = torch.load('m.pt', weights_only=False)",
    "import torch\nloader = torch.load",
    "from torch import load",
    "import torch\ntorch.save(model.state_dict(), 'm.pt')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import pandas as pd\npd.read_pickle('x.pkl')",
])
def test_the_scanner_catches_unpickling(snippet):
    assert unsafe_loading(snippet), snippet


def test_the_scanner_lets_safe_loading_pass():
    assert unsafe_loading("import torch\nimport numpy as np\nfrom safetensors.torch import load_file\n"
                          "w = torch.load('m.pt', weights_only=True)\nx = np.load('x.npz')\n") == []


def test_nothing_in_core_or_dashboard_unpickles():
    files = [p for folder in SCANNED for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 10
    found = [hit for p in files for hit in unsafe_loading(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == []


# -- optimizer state through safetensors -----------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optimizer_state_round_trips_through_safetensors(tmp_path, optimizer):
    config = tiny_config(optimizer=optimizer, weight_decay=0.01, betas=(0.8, 0.95))
    torch.manual_seed(0)
    model = build_model(config.model)
    opt = build_optimizer(model, config)
    x = torch.randn(4, 1, 28, 28)
    t = torch.randint(1, 21, (4,))
    for _ in range(3):
        opt.zero_grad()
        model(x, t).square().mean().backward()
        opt.step()
    io.save_optimizer(tmp_path / "optimizer.safetensors", opt)

    twin = build_model(config.model)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, config)
    io.load_optimizer(tmp_path / "optimizer.safetensors", twin_opt, "rt")

    a, b = opt.state_dict(), twin_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) == len(list(model.parameters()))
    for index, entry in a["state"].items():
        assert set(entry) == set(b["state"][index]) >= {"step", "exp_avg", "exp_avg_sq"}
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key])), (index, key)
    # The restored optimizer then takes exactly the same step.
    for net, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        net(x, t).square().mean().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_resume_restores_the_optimizer_moments(tmp_path, tiny_images):
    run = runs.create_run(tmp_path, "moments", tiny_config(max_steps=4))
    train_run(run, images=tiny_images)
    saved = load_file(run / "optimizer.safetensors")
    assert int(saved["0.step"]) == 4 and {"0.exp_avg", "0.exp_avg_sq"} <= set(saved)
    # Resuming with no steps left re-saves the optimizer it loaded: it must be the very same state.
    train_run(run, resume=True, images=tiny_images)
    again = load_file(run / "optimizer.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    # ... and two more steps run on from it (a fresh optimizer would count 2, with new moments).
    io.atomic_write_text(run / "config.json", override(runs.load_config(run), max_steps=6).to_json())
    train_run(run, resume=True, images=tiny_images)
    assert int(load_file(run / "optimizer.safetensors")["0.step"]) == 6


# -- the dashboard's server settings ---------------------------------------------------------------------
def test_streamlit_binds_to_localhost_with_xsrf_protection():
    with open(REPO / ".streamlit" / "config.toml", "rb") as fh:
        server = tomllib.load(fh)["server"]
    assert server["address"] in ("127.0.0.1", "localhost", "::1")
    assert server["enableXsrfProtection"] is True
    assert server.get("enableCORS", True) is True
    # `make run` must not override either on its command line.
    launch = [line for line in (REPO / "Makefile").read_text().splitlines() if "streamlit run" in line]
    assert launch and not any(flag in line for line in launch
                              for flag in ("server.address", "enableXsrfProtection", "enableCORS"))


# -- names stay inside the runs folder -------------------------------------------------------------------
BAD_NAMES = ["../x", "..", ".", "a/b", "/etc", "a\\b", ".hidden", "", " ", "x" * 81, "ünïcödé", "名前",
             "run\n", "run\x00", "tab\tname", "~", "~user", "a b", "$HOME", "x;rm -rf"]
GOOD_NAMES = ["a", "run-1_2.3", "x" * 80, "A.b-c_d", "book-unet-adam-20240101-120000"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[1:-1][:20] or "empty" for n in BAD_NAMES])
def test_bad_names_never_become_paths(tmp_path, name):
    root = tmp_path / "runs"
    root.mkdir()
    with pytest.raises(ConfigError, match=r"^name = .* is not allowed"):
        runs.run_path(root, name)
    with pytest.raises(ConfigError):
        runs.create_run(root, name, tiny_config())
    with pytest.raises(ConfigError):
        runs.delete_run(root, name)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs"]  # nothing made, here or above


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_stay_directly_inside(tmp_path, name):
    path = runs.run_path(tmp_path, name)
    assert path.parent == tmp_path.resolve() and path.name == name


def test_a_symlink_cannot_lead_a_name_out_of_the_runs_folder(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("do not delete")
    root = tmp_path / "runs"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ConfigError, match="leaves the runs folder"):
        runs.run_path(root, "link")
    with pytest.raises(ConfigError):
        runs.delete_run(root, "link")
    assert (outside / "keep.txt").read_text() == "do not delete"
