"""`python -m core bench`: the flags and the measurements live in core/bench/ (runner.py); this module
only puts them under the command line."""
from __future__ import annotations

from .. import bench


def add_parser(sub) -> None:
    be = sub.add_parser("bench", help="measure training and sampling speed on this device")
    bench.add_arguments(be)
    be.set_defaults(handler=bench.run)
