"""Showing a person what a slow step is doing: a spinner with the elapsed time on a terminal, one
log line per step otherwise, and one line naming the step that Ctrl-C interrupted."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

from rich.console import Console


def pace(tokens: int, seconds: float) -> str:
    """How a prefill (or a decode) went, the one way it is shown: "read 33 tokens in 0.3 s (119 tokens/s)"."""
    # One token's time is one forward step, not a reading pace (a prefix receiver reads only its last token).
    rate = f" ({tokens / seconds:.0f} tokens/s)" if seconds > 0 and tokens > 1 else ""
    return f"read {tokens} token{'' if tokens == 1 else 's'} in {seconds:.1f} s{rate}"


class Interrupted(BaseException):
    """Ctrl-C during a named step; the message says which (`interrupted while loading ...`).

    Not a KeyboardInterrupt, which the command-line framework turns into a bare exit status: this
    travels to `agentmesh.cli.main`, which prints it and exits with status 130.
    """


class Steps:
    """Shows one step at a time on `console` (stderr by default), so stdout stays the answer alone.

    `live` (default: whether the console is a terminal) draws a spinner with the elapsed time that
    disappears when the step ends; otherwise each step is one line when it starts.
    """

    def __init__(self, console: Console | None = None, *, live: bool | None = None):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self.times: dict[str, float] = {}  # step name -> seconds it took

    def _line(self, text: str) -> None:
        # Written straight through (not via rich's buffer, which Ctrl-C can leave holding a copy).
        self.console.file.write(text + "\n")
        self.console.file.flush()

    @contextmanager
    def step(self, name: str, label: str) -> Iterator[Callable[[str], None]]:
        """Run a step (`name` keys `times`; `label` is shown, e.g. "loading smollm2 (538 MB)").

        Yields `update(label)` to change what is shown (e.g. a token count). Ctrl-C inside raises
        `Interrupted` naming the label shown at that moment.
        """
        shown = [label]
        start = time.perf_counter()
        try:
            if self.live:
                from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
                with Progress(*columns, console=self.console, transient=True) as bar:
                    task = bar.add_task(label)

                    def update(text: str) -> None:
                        shown[0] = text
                        bar.update(task, description=text)

                    yield update
            else:
                self._line(f"{label} …")

                def log(text: str) -> None:
                    # A new line when the kind of work changes ("decoding"), not on every count.
                    if text and text.split()[0] != shown[0].split()[0]:
                        self._line(f"{text} …")
                    shown[0] = text or shown[0]

                yield log
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted while {shown[0]}") from None
        finally:
            self.times[name] = time.perf_counter() - start


class _Lines:
    """A stream for tqdm off a terminal: each redraw (tqdm's "\\r" + status) becomes one line."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 log_every_s: float = 30.0) -> Any:
    """A tqdm bar on stderr: redrawn in place on a terminal; off one (a log file, CI), one line at
    most every `log_every_s` seconds and at the end, never a screen of carriage returns."""
    import sys

    from tqdm.auto import tqdm

    if not enabled or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=_Lines(sys.stderr), mininterval=log_every_s,
                ncols=120, ascii=True)
