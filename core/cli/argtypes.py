"""argparse value types shared by every subcommand: a bad value becomes one clear line, not a traceback."""
from __future__ import annotations

import argparse


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def comma_list(item_type):
    """An argparse type for "a,b,c": each item converted with `item_type` (a bad one names itself)."""
    def convert(text: str) -> list:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is empty: give values separated by commas, like 10,20,50")
        return [item_type(part) for part in items]
    return convert
