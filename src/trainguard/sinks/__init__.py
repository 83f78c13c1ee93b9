"""Sinks: they only listen. None of them imports its library at ``import trainguard``.

    tg.Guard(model, opt, sinks=[trainguard.sinks.TensorBoardSink("runs/exp1")])

``ConsoleSink`` and ``JsonlSink`` are built from the Guard's ``console=``/``log=`` options;
``TensorBoardSink``, ``WandbSink`` and ``MLflowSink`` log statistics as scalars and findings and
actions as text, never a bare NaN (a finite flag and counters beside each value).
"""
from __future__ import annotations

from typing import Any

from .base import ScalarSink, Sink
from .console import ConsoleSink
from .jsonl import JsonlSink, read_events

__all__ = ["Sink", "ScalarSink", "ConsoleSink", "JsonlSink", "read_events", "TensorBoardSink",
           "WandbSink", "MLflowSink"]


def __getattr__(name: str) -> Any:
    if name == "TensorBoardSink":
        from .tensorboard import TensorBoardSink
        return TensorBoardSink
    if name == "WandbSink":
        from .wandb import WandbSink
        return WandbSink
    if name == "MLflowSink":
        from .mlflow import MLflowSink
        return MLflowSink
    raise AttributeError(f"module 'trainguard.sinks' has no attribute {name!r}")
