"""The one JSON reader for every file the workbench reads: numbers are finite and bounded.

A file in a run folder, the queue or a sweep may be damaged or hostile. Python's json turns
`1e999` into inf and a 400-digit integer into an int that raises OverflowError the moment it meets
a float (a comparison with 1e-3, a division, `float()`), far from the reader and in code that
never expected it. So every number is checked where it is parsed: floats must be finite, integers
must fit in 2**53 (every such integer is exact as a float, and no count, step, size or timestamp
the project writes comes near it). Deep nesting ends as the same ValueError.
"""
from __future__ import annotations

import json
import math
from typing import Any

# Integers the project writes (steps, seeds, sizes in bytes, Unix times) are far below 2**53; past
# it an integer is no longer exact as a float, and the comparisons all over the readers use floats.
MAX_JSON_INT = 2 ** 53
MAX_INT_DIGITS = 16  # len(str(2**53)); longer text is refused before int() parses it


class JSONNumberError(ValueError):
    """A number in a JSON file is out of range (non-finite float, integer past 2**53)."""


class JSONNestingError(ValueError):
    """A JSON file nested deeper than Python's recursion allows (a hostile file, 100,000 levels)."""


def _short(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}…({len(text)} characters)"


def bounded_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > MAX_INT_DIGITS or abs(int(text)) > MAX_JSON_INT:
        raise JSONNumberError(f"the integer {_short(text)} is out of range (at most 2**53)")
    return int(text)


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf; no file of the project holds one legitimately
        raise JSONNumberError(f"the number {_short(text)} is out of range")
    return value


def loads(text: str | bytes) -> Any:
    """`json.loads` with finite floats and bounded integers. Raises ValueError (a JSONDecodeError,
    a JSONNumberError, or one for nesting too deep to be a file of the project)."""
    try:
        return json.loads(text, parse_float=finite_float, parse_int=bounded_int, parse_constant=finite_float)
    except RecursionError:
        raise JSONNestingError("nested too deeply to be a file of the workbench") from None


def describe(exc: ValueError) -> str:
    """One short reason for a `loads` failure, for an error line."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno}"
    return " ".join(str(exc).split())[:120]
