"""Argparse types for the front ends' flags (app.py, bench/): a bad value is refused by its flag's name, with
what it must be, before anything loads."""

from __future__ import annotations

import argparse
import math


def at_least_one(text: str) -> int:
    """A count: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """A duration: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value
