"""Formatting sizes for people (CLI lines, tables, reports, the README).

One convention everywhere: SI decimal units, 1 kB = 1,000 bytes and 1 MB = 1,000,000 bytes.
"""
from __future__ import annotations

import re

_UNITS = ("B", "kB", "MB", "GB", "TB")


def human_bytes(n: float) -> str:
    """`n` bytes in SI units: "512 B", "1.5 kB", "19.9 MB"."""
    size = float(n)
    for unit in _UNITS:
        if abs(size) < 1000 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


_SIZE = re.compile(r"^\s*(\d+)\s*([kMGT]i?B|B)?\s*$")
_FACTORS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KiB": 1 << 10, "kiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_bytes(text: str) -> int:
    """A size as people write it: "536870912", "512MiB", "64 MB" (SI kB/MB/GB, binary KiB/MiB/GiB);
    `ValueError` naming the text otherwise."""
    m = _SIZE.match(text)
    if m is None or (m.group(2) or "B") not in _FACTORS:
        raise ValueError(f"{text!r} is not a size; write bytes, or a number with kB, MB, GB, KiB, MiB or GiB")
    return int(m.group(1)) * _FACTORS[m.group(2) or "B"]
