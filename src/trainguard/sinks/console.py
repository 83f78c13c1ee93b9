"""Console sink: one line per intervention and per finding, a summary at the end.

Uses rich when it is installed (``trainguard[cli]``), plain text otherwise. Repeated clips are
folded: a clip line is printed at most once per ``clip_every`` steps, with the count since.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from ..types import Action, Finding
from .base import Sink

_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


class ConsoleSink(Sink):
    def __init__(self, stream: TextIO | None = None, *, prefix: str = "trainguard",
                 clip_every: int = 50, rank: int = 0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self.clip_every = clip_every
        self.rank = rank
        self._last_clip = -10**9
        self._clips_since = 0
        self._console: Any = None
        try:
            from rich.console import Console
            self._console = Console(file=self.stream, highlight=False, soft_wrap=True)
        except ImportError:  # pragma: no cover - rich is optional
            self._console = None

    def _print(self, text: str, style: str = "") -> None:
        if self.rank != 0:
            return
        if self._console is not None:
            from rich.markup import escape
            body = escape(text)
            self._console.print(f"[{style}]{body}[/]" if style else body)
        else:
            print(text, file=self.stream, flush=True)

    def on_finding(self, f: Finding) -> None:
        at = f" in {f.where}" if f.where else ""
        origin = f" (origin: {f.origin})" if f.origin else ""
        self._print(f"{self.prefix} step {f.step}: {f.kind}{at}{origin}: {f.message}",
                    _STYLE.get(f.severity, ""))

    def on_action(self, a: Action) -> None:
        if a.kind == "clip":
            self._clips_since += 1
            if a.step - self._last_clip < self.clip_every:
                return
            n = self._clips_since
            self._last_clip, self._clips_since = a.step, 0
            more = f" ({n} clips since the last report)" if n > 1 else ""
            self._print(f"{self.prefix} step {a.step}: clip: {a.reason}{more}", "magenta")
            return
        self._print(f"{self.prefix} step {a.step}: {a.kind}: {a.reason}",
                    "bold red" if a.kind == "halt" else "magenta")

    def on_event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        if kind == "bad_batch":  # which rows the step just judged bad trained on
            self._print(f"{self.prefix} step {step}: {data.get('message', kind)}", "magenta")
        elif kind in ("coupled_losses", "loss_changed"):  # the loss rules changed course
            self._print(f"{self.prefix} step {step}: {data.get('message', kind)}", "yellow")

    def close(self, summary: str | None = None) -> None:
        if summary:
            self._print(summary)
