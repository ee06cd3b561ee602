"""argparse types shared by every rksc-sgl command line (``rksc-sgl``, ``launch-server``,
the programs' own options): a leaf module, so that each parser can use them without
importing another parser's module."""

from __future__ import annotations

import argparse
import sys


def on_off(text: str) -> bool:
    """An argparse type for switches that default on or off: ``on``/``off`` (or yes/no, 1/0);
    declare a switch with :func:`on_off_flag`, which lists the choices."""
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


ON_OFF_CHOICES = (True, False)
ON_OFF_METAVAR = "{on,off}"


def on_off_flag(**kwargs):
    """``add_argument`` keyword arguments of an on/off switch: ``on_off`` values, the two
    choices declared (``--help`` shows ``{on,off}``), plus ``kwargs`` (``default``, ``help``)."""
    return {"type": on_off, "choices": ON_OFF_CHOICES, "metavar": ON_OFF_METAVAR, **kwargs}


def on_off_text(value) -> str:
    """``True``/``False``/``None`` as a help text shows a switch's default: on, off, unset."""
    return "unset" if value is None else ("on" if value else "off")


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's ``dest`` (after the same
    ``type``) and prints a one-line notice on stderr. Hidden from ``--help``; declare it with
    :func:`add_deprecated_alias`."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept ``old`` as ``new`` (same ``dest``; ``kwargs``: the new flag's ``type``/``choices``),
    with a notice when it is used. Its default is suppressed, so it never overrides the new
    flag's."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)


def add_model_path(parser, default, help_text: str) -> None:
    """``--model-path`` (SGLang's spelling; ``dest="model"``), with ``--model`` as its deprecated alias."""
    parser.add_argument("--model-path", dest="model", default=default, metavar="MODEL", help=help_text)
    add_deprecated_alias(parser, "--model", "--model-path", "model", metavar="MODEL")
