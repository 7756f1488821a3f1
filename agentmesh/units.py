"""Formatting sizes for people (CLI lines, tables, reports, the README).

One convention everywhere: SI decimal units, 1 kB = 1,000 bytes and 1 MB = 1,000,000 bytes.
"""
from __future__ import annotations

_UNITS = ("B", "kB", "MB", "GB", "TB")


def human_bytes(n: float) -> str:
    """`n` bytes in SI units: "512 B", "1.5 kB", "19.9 MB"."""
    size = float(n)
    for unit in _UNITS:
        if abs(size) < 1000 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
