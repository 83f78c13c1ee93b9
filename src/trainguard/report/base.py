"""Moved to :mod:`trainguard.sinks.base`; this path keeps working."""
from ..sinks.base import *  # noqa: F401,F403
