"""Weights & Biases sink: statistics and counters as metrics against their own x-axis
``trainguard/step``, findings and actions as text and, at the end, one table of every event.

``wandb`` is imported when the sink is made. W&B drops NaN points from its charts and refuses
history rows logged at a step below its current one (trainguard's deferred mode dates events a
few steps late), so this sink never passes ``step=`` to ``run.log``: it declares
``trainguard/*`` metrics against ``trainguard/step`` (``define_metric``) and never logs a bare
NaN (:class:`~trainguard.sinks.base.ScalarSink`). The user's own ``wandb.log`` calls and steps are
left alone.
"""
from __future__ import annotations

from typing import Any

from .base import PREFIX, ScalarSink


class WandbSink(ScalarSink):
    """``WandbSink(run=None, **init)``: log into ``run``, else the active ``wandb.run``, else a run
    started with ``wandb.init(**init)`` (finished at the end; only a run the sink started)."""

    def __init__(self, run: Any = None, *, modules: int = 32, **init: Any) -> None:
        super().__init__(modules=modules)
        try:
            import wandb
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("WandbSink needs wandb: pip install 'trainguard[wandb]'") from e
        self._wandb = wandb
        self._own = False
        if run is None:
            run = wandb.run
            if run is None:
                run = wandb.init(**init)
                self._own = True
        elif init:
            raise ValueError("WandbSink: give either run= or wandb.init arguments, not both")
        if not callable(getattr(run, "log", None)):
            raise TypeError(f"run must be a wandb Run, got {type(run).__name__}")
        self.run = run
        run.define_metric(f"{PREFIX}/step")
        run.define_metric(f"{PREFIX}/*", step_metric=f"{PREFIX}/step")

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{PREFIX}/step": step, **values})

    def _text(self, step: int, tag: str, text: str) -> None:
        self.run.log({f"{PREFIX}/step": step, f"{tag}_text": text})

    def _finish(self, summary: str | None) -> None:
        rows = [[e["step"], e["type"], e["kind"], e["severity"], e["where"], e["text"]]
                for e in self.events]
        if rows:
            table = self._wandb.Table(columns=["step", "type", "kind", "severity", "where", "text"],
                                      data=rows)
            self.run.log({f"{PREFIX}/step": rows[-1][0], f"{PREFIX}/event_table": table})
        if summary:
            self.run.summary[f"{PREFIX}/summary"] = summary
        for k, n in self.finding_counts.items():
            self.run.summary[f"{PREFIX}/findings/{k}"] = n
        for k, n in self.action_counts.items():
            self.run.summary[f"{PREFIX}/actions/{k}"] = n
        if self._own:
            self.run.finish()
