"""Argument types the benchmark command lines share."""

import argparse


def positive_int(text: str) -> int:
    """An argparse `type` for counts that must be at least 1 (steps, runs).

    Refusing a bad count while parsing gives argparse's usage line and exit status 2, before
    anything compiles.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
