"""Formatting sizes for people (CLI lines, tables, reports)."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    """`n` bytes in binary units: "512 B", "1.5 KB", "19.0 MB"."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
