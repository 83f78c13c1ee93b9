"""Progress and an ETA for long work (the zoo, the doctor's phases, repair, the benchmarks).

On a terminal with rich installed: a live bar with the time remaining. Elsewhere (CI logs,
``nohup``): one line per item on stderr, ``[3/52] zoo: grad_rnn seed 1 (elapsed 0:41, ETA 11:02)``.
The ETA is the mean time of the items done so far times the items left.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """``with Progress(n, "zoo") as p: for job in jobs: p.start(name); ...``

    ``enabled``: True / False, or None (default) for "when ``stream`` is a terminal or the caller
    is a command-line tool" (the CLI passes True)."""

    def __init__(self, total: int, label: str, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.total, self.label = int(total), label
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = tty if enabled is None else bool(enabled)
        self.done = 0
        self.t0 = time.perf_counter()
        self._item_start: float | None = None
        self._bar: Any = None
        self._task: Any = None
        if self.enabled and tty:
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar,
                                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
                self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(file=self.stream), transient=True)
            except ImportError:  # pragma: no cover - rich is optional
                self._bar = None

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def eta(self) -> float | None:
        if self.done == 0:
            return None
        return (time.perf_counter() - self.t0) / self.done * max(0, self.total - self.done)

    def start(self, what: str) -> None:
        """Item ``what`` begins (the previous one, if any, is counted done)."""
        if self._item_start is not None:
            self.advance()
        self._item_start = time.perf_counter()
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.label}: {what}")
            return
        eta = self.eta()
        print(f"[{self.done + 1}/{self.total}] {self.label}: {what} (elapsed "
              f"{_clock(time.perf_counter() - self.t0)}"
              + (f", ETA {_clock(eta)}" if eta is not None else "") + ")",
              file=self.stream, flush=True)

    def advance(self) -> None:
        self.done += 1
        self._item_start = None
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._item_start is not None:
            self.advance()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self.enabled and self.done:
            print(f"{self.label}: {self.done}/{self.total} done in "
                  f"{_clock(time.perf_counter() - self.t0)}", file=self.stream, flush=True)
