"""The run report (``trainguard report``, ``guard.save_html``) and, at their old import path,
the sinks (now in :mod:`trainguard.sinks`)."""
from typing import Iterable

from ..sinks import ConsoleSink, JsonlSink, Sink, read_events

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "read_events", "build_sinks"]


_METHODS = ("on_finding", "on_action", "on_stats", "on_event", "close")


def build_sinks(console: bool, log: str | None, extra: "Iterable[Sink]" = (),
                rank: int = 0) -> "list[Sink]":
    """The sinks every guard front-end builds from its ``console``/``log``/``sinks`` options."""
    out: list[Sink] = []
    if console:
        out.append(ConsoleSink(rank=rank))
    if log:
        out.append(JsonlSink(log, rank=rank))
    for s in extra:
        if not all(callable(getattr(s, m, None)) for m in _METHODS):
            raise TypeError(f"sinks must be trainguard.sinks.Sink objects (TensorBoardSink, "
                            f"WandbSink, MLflowSink, ...), got {type(s).__name__} (a sink has "
                            f"{', '.join(_METHODS)})")
        out.append(s)
    return out
