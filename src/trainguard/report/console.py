"""Moved to :mod:`trainguard.sinks.console`; this path keeps working."""
from ..sinks.console import *  # noqa: F401,F403
