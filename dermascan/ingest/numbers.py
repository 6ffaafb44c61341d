"""The one way a number written by someone outside becomes a Python number.

``str.isdigit`` accepts superscripts and other scripts' digits ("²", "٣") that ``int`` then
refuses, ``int`` takes twenty-digit page numbers that no database column holds, and ``float`` of
a 400-digit integer overflows: each was a server error. Here a number is ASCII digits (an optional
sign, for floats a decimal point and exponent), a bounded length, and a range the caller states;
anything else is an :class:`NumberError` (a 400) that names the field.
"""

from __future__ import annotations

import math
import re

from dermascan.errors import Invalid

_INT = re.compile(r"[+-]?[0-9]{1,30}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?")


class NumberError(Invalid):
    """A value that is not a number in range; the message names the field."""

    def __init__(self, name: str, message: str):
        self.field = name
        super().__init__(message)


def parse_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` (str or int) as an int in [minimum, maximum], else NumberError."""
    if isinstance(value, bool):
        raise NumberError(name, f"{name} must be a whole number")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if not _INT.fullmatch(text):
            raise NumberError(name, f"{name} must be a whole number written with the digits 0–9")
        number = int(text)
    return _in_range(number, name, minimum, maximum)


def parse_float(value, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` (str, int or float) as a finite float in [minimum, maximum], else NumberError."""
    if isinstance(value, bool):
        raise NumberError(name, f"{name} must be a number")
    if isinstance(value, int):
        if abs(value) > 10**30:
            raise NumberError(name, f"{name} is far outside any range it may have")
        number = float(value)
    elif isinstance(value, float):
        number = value
    else:
        text = str(value).strip()
        if not _FLOAT.fullmatch(text):
            raise NumberError(name, f"{name} must be a number written with the digits 0–9")
        number = float(text)
    if not math.isfinite(number):
        raise NumberError(name, f"{name} must be a finite number")
    return _in_range(number, name, minimum, maximum)


def page_number(value, most: int) -> int:
    """A page number from a query string, clamped to [1, most]: a page past the end (however many
    digits) is the last one there can be; anything that is not ASCII digits is the first."""
    text = "" if value is None else str(value).strip()
    if not (text.isascii() and text.isdigit()):
        return 1
    return most if len(text) > 30 else min(max(1, int(text)), most)


def _in_range(number, name: str, minimum, maximum):
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise NumberError(name, f"{name} must be between {_bound(minimum)} and {_bound(maximum)}")
    return number


def _bound(value) -> str:
    return "any" if value is None else f"{value:,}"
