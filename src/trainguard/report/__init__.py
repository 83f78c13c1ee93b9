"""Sinks: they only listen. None of them imports its library at trainguard import time."""
from typing import Iterable

from .base import Sink
from .console import ConsoleSink
from .jsonl import JsonlSink, read_events

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "read_events"]


def build_sinks(console: bool, log: str | None, extra: "Iterable[Sink]" = (),
                rank: int = 0) -> "list[Sink]":
    """The sinks every guard front-end builds from its ``console``/``log``/``sinks`` options."""
    out: list[Sink] = []
    if console:
        out.append(ConsoleSink(rank=rank))
    if log:
        out.append(JsonlSink(log, rank=rank))
    out.extend(extra)
    return out
