"""Errors that end in one clear line for the user (the CLI prints them and exits with status 2).

`ConfigError` lives in `config.py`, the root of the import graph; these two belong to run folders
and to the command line, and are imported by modules on both sides of those, so they sit here.
"""
from __future__ import annotations


class RunError(RuntimeError):
    """A run folder is missing, damaged or unusable; the message names the run and the file."""


class CliError(Exception):
    """A user-facing failure of a command: printed as one line, exit status 2."""
