"""Writing files so that an interrupted write (Ctrl-C, a crash, a full disk) never leaves a
half-written file behind: the bytes go to a temporary file beside the target, which replaces the
target only once complete."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` all at once or not at all; an older file at `path` stays until then."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: nothing partial stays behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """`records` as JSON lines (UTF-8, one object a line), written as `write_atomic` writes."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def make_folder(path: str | Path, what: str) -> Path:
    """`path` as a folder (created with its parents); a ConfigError naming `what` when it cannot be one."""
    from agentmesh.errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {path} is a file; give a folder (it is created if missing)") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be created: {e.strerror or e}") from None
    return path


class FileProblem(Exception):
    """A path that cannot be read as a text file; the message says why ("is a directory")."""


def read_text_limited(path: str | Path, limit: int) -> str:
    """The UTF-8 text of the regular file at `path`, refusing anything else before opening it
    (a directory, a FIFO that would block, /dev/zero that never ends) and files over `limit` bytes."""
    import stat

    from agentmesh.units import human_bytes

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileProblem("does not exist") from None
    except OSError as e:
        raise FileProblem(f"cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise FileProblem("is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise FileProblem("is not a regular file (a FIFO, socket or device)")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FileProblem(f"cannot be read: {e.strerror or e}") from None
    if len(data) > limit:
        raise FileProblem(f"is larger than {human_bytes(limit)}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileProblem("is not UTF-8 text") from None
