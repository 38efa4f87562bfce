"""eval.json of a run: its evaluation entries, read bounded and checked, appended without ever
writing a non-finite figure (which would replace a good entry and make the file unreadable)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import RunError
from .io import MAX_EVAL_BYTES, atomic_write_text, read_json_file


def read_eval(path: Path) -> list[dict[str, Any]]:
    """The evaluation entries of eval.json (objects only); RunError when the file is hostile."""
    data = read_json_file(path / "eval.json", MAX_EVAL_BYTES, path.name, missing_ok=True)
    if data is None:
        return []
    if not isinstance(data, list):
        raise RunError(f"run {path.name!r}: eval.json is not a list of evaluation entries")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise RunError(f"run {path.name!r}: eval.json entry {index} is not an object; delete the file "
                           "or fix that entry, then evaluate again")
    return data


def append_eval(path: Path, entry: dict[str, Any]) -> None:
    """Add an evaluation entry, replacing an earlier one of the same sampler setting, sample count and
    classifier (a figure at another N or from another classifier is another measurement, kept)."""
    key = ("setting", "n", "classifier_sha256")
    try:  # a non-finite figure (damaged statistics) would replace a good entry and make eval.json unreadable
        json.dumps(entry, allow_nan=False)
    except ValueError:
        raise RunError(f"run {path.name!r}: the evaluation gave a non-finite figure; eval.json was left as it "
                       "was (delete the classifier's *.test-stats.safetensors cache and evaluate again)") from None
    entries = [e for e in read_eval(path) if not isinstance(e, dict) or any(e.get(k) != entry.get(k) for k in key)]
    entries.append(entry)
    atomic_write_text(path / "eval.json", json.dumps(entries, indent=2, allow_nan=False))
