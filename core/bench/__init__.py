"""`python -m core bench`: speed of training and sampling on this device, as ratios measured in one
run (runner.py), the book's own step-9 code to measure against (reference.py), and FLOP counts
(flops.py)."""
from .runner import add_arguments, run, run_bench

__all__ = ["add_arguments", "run", "run_bench"]
