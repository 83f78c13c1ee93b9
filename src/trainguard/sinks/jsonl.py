"""JSONL event log: findings, actions and sampled statistics, one JSON object per line.

Non-finite numbers are never dropped or hidden: they are written as the strings "NaN",
"Infinity" and "-Infinity" (valid JSON that any reader can parse), and :func:`read_events`
turns them back into floats. Each line is written with one ``write`` call and flushed.

The file is appended to: each sink opened on it starts with a ``run_start`` line (the time it
was opened), and a Guard resumed from a saved state adds ``run_resumed`` (the step it resumed
at). ``trainguard report`` shows the last run of a log that holds several, and ``--run K`` any
one of them.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from typing import Any, Iterator

from ..types import Action, Finding, StepStats
from .base import Sink

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode(x: Any) -> Any:
    """Make a value JSON-safe, spelling NaN/Inf as strings."""
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return x
    if isinstance(x, dict):
        return {str(k): encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        return encode(x.item())
    if hasattr(x, "tolist"):
        return encode(x.tolist())
    if isinstance(x, (int, str, bool)) or x is None:
        return x
    return str(x)


def decode(x: Any) -> Any:
    if isinstance(x, str) and x in _NONFINITE:
        return _NONFINITE[x]
    if isinstance(x, dict):
        return {k: decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode(v) for v in x]
    return x


def raw_events(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the events of a trainguard JSONL log as parsed (NaN/Inf still the strings
    ``"NaN"``/``"Infinity"``); a line that is not a JSON object raises ValueError naming it."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a trainguard JSONL event ({e.msg})") from None
            if not isinstance(d, dict):
                raise ValueError(f"{path}:{n}: not a trainguard JSONL event (expected an object)")
            yield d


def read_events(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the events of a trainguard JSONL log with NaN/Inf restored as floats."""
    for d in raw_events(path):
        yield decode(d)


class JsonlSink(Sink):
    def __init__(self, path: str | os.PathLike, *, rank: int = 0) -> None:
        self.path = os.fspath(path)
        if rank:
            root, ext = os.path.splitext(self.path)
            self.path = f"{root}.rank{rank}{ext or '.jsonl'}"
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        # where this run begins in a log that may hold earlier ones (report: the last run)
        self._write({"type": "run_start", "step": 0,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime())})

    def _write(self, obj: dict[str, Any]) -> None:
        if self._fh.closed:
            return
        self._fh.write(json.dumps(encode(obj), allow_nan=False) + "\n")
        self._fh.flush()

    def on_finding(self, f: Finding) -> None:
        self._write({"type": "finding", **f.to_dict()})

    def on_action(self, a: Action) -> None:
        self._write({"type": "action", **a.to_dict()})

    def on_stats(self, s: StepStats) -> None:
        d = asdict(s)
        d["modules"] = list(s.modules)
        self._write({"type": "stats", **d})

    def on_event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        self._write({"type": kind, "step": step, **data})

    def close(self, summary: str | None = None) -> None:
        if not self._fh.closed:
            if summary:
                self._write({"type": "summary", "text": summary})
            self._fh.close()
