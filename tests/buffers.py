"""Whether a tensor views a buffer's memory (no copy was made), for the zero-copy tests."""
from __future__ import annotations

import torch


def inside(t: torch.Tensor, buf: bytearray | memoryview) -> bool:
    """Whether every byte of `t` lies in `buf`'s memory."""
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + len(buf)
