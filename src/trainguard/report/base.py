from __future__ import annotations

from typing import Any

from ..types import Action, Finding, StepStats


class Sink:
    """Receives events; must never change training state."""

    def on_finding(self, finding: Finding) -> None: ...

    def on_action(self, action: Action) -> None: ...

    def on_stats(self, stats: StepStats) -> None: ...

    def on_event(self, kind: str, step: int, data: dict[str, Any]) -> None: ...

    def close(self, summary: str | None = None) -> None: ...
