"""argparse types shared by every rksc-sgl command line (``rksc-sgl``, ``launch-server``,
the programs' own options): a leaf module, so that each parser can use them without
importing another parser's module."""

from __future__ import annotations

import argparse


def on_off(text: str) -> bool:
    """An argparse type for switches that default on or off: ``on``/``off`` (or yes/no, 1/0)."""
    value = str(text).strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def fraction(text: str) -> float:
    """An argparse type for a share: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
