"""How the report writes numbers: rounded to significant digits in the CSV, shortened in the tables."""

from __future__ import annotations

import math


def significant(value, digits=3):
    """`value` rounded to `digits` significant digits ("" stays "")."""
    if value is None or value == "":
        return ""
    if value == 0:
        return 0
    return round(value, max(digits - 1 - int(math.floor(math.log10(abs(value)))), 0))


def format_number(value, digits=3) -> str:
    """A table cell: `digits` significant digits, or the integer part where that is longer."""
    if value == "" or value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def span(values: list, suffix: str = "×") -> str:
    """"low–high" of the values that are set (one value where both print alike), with `suffix`."""
    values = [v for v in values if v != ""]
    if not values:
        return ""
    low, high = format_number(min(values)), format_number(max(values))
    return f"{low}{suffix}" if low == high else f"{low}–{high}{suffix}"
