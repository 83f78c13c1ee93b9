"""Moved to :mod:`trainguard.sinks.jsonl`; this path keeps working."""
from ..sinks.jsonl import *  # noqa: F401,F403
