"""The argparse ``type=`` functions: text -> value, or one line naming what is wrong.

argparse puts the flag's name in front of the message (``--port: 'x' is not
a port number``), so each message says only what the text is and what it must
be. A number is converted once, by :func:`_converted`; the checks after it are
each flag's own.
"""

from __future__ import annotations

import argparse
import math
import ssl
from collections.abc import Callable
from typing import TypeVar

from ._proxy import parse_trusted

_N = TypeVar("_N", int, float)


def _converted(text: str, convert: Callable[[str], _N], what: str) -> _N:
    """``convert(text)``; a ValueError becomes "``text`` is not ``what``"."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def seconds(text: str) -> float:
    value = _converted(text, float, "a number of seconds")
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def positive_number(text: str) -> float:
    value = _converted(text, float, "a number")
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number > 0")
    return value


def _whole_number(text: str, minimum: int) -> int:
    value = _converted(text, int, "a whole number")
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def natural_int(text: str) -> int:
    return _whole_number(text, 0)


def port(text: str) -> int:
    value = _converted(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 0-65535")
    return value


def address_list(text: str) -> str:
    try:
        parse_trusted(text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def ciphers(text: str) -> str:
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).set_ciphers(text)
    except ssl.SSLError:
        raise argparse.ArgumentTypeError(f"{text!r} selects no cipher OpenSSL knows") from None
    return text
