"""Sinks: they only listen. None of them imports its library at trainguard import time."""
from .base import Sink
from .console import ConsoleSink
from .jsonl import JsonlSink, read_events

__all__ = ["Sink", "ConsoleSink", "JsonlSink", "read_events"]
