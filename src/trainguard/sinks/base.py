"""The sink protocol, and the shared logic of the metric-logger sinks (TensorBoard, W&B, MLflow).

Every mainstream logger mishandles the values trainguard exists for: W&B charts drop NaN points,
TensorBoard draws nothing between NaNs, MLflow's SQL stores turn NaN into 0 and Inf into
±1.8e308. :class:`ScalarSink` therefore never hands a backend a non-finite number: a statistic is
logged as its value when finite and left out when not, and beside it go a finite flag
(``trainguard/finite/<name>``: 1 or 0) and cumulative counters
(``trainguard/nonfinite/<name>``, ``trainguard/nonfinite/steps``), so "the loss went NaN at step
4,812" is a point on a chart, not a hole in it.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from ..types import Action, Finding, StepStats

PREFIX = "trainguard"


class Sink:
    """Receives events; must never change training state."""

    def on_finding(self, finding: Finding) -> None: ...

    def on_action(self, action: Action) -> None: ...

    def on_stats(self, stats: StepStats) -> None: ...

    def on_event(self, kind: str, step: int, data: dict[str, Any]) -> None: ...

    def close(self, summary: str | None = None) -> None: ...


def _num(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def finding_text(f: Finding) -> str:
    where = f" in {f.where}" if f.where else ""
    origin = f" (origin: {f.origin})" if f.origin else ""
    return f"step {f.step}: finding {f.kind} [{f.severity}]{where}{origin}: {f.message}"


def action_text(a: Action) -> str:
    return f"step {a.step}: action {a.kind}: {a.reason}"


def event_text(kind: str, step: int, data: dict[str, Any]) -> str:
    body = data.get("message") or data.get("text") or json.dumps(
        {k: v for k, v in data.items()}, default=str, sort_keys=True)
    return f"step {step}: {kind}: {body}"


class ScalarSink(Sink):
    """What the TensorBoard, W&B and MLflow sinks share; a backend implements
    :meth:`_scalars` (one step's numbers, all finite), :meth:`_text` (one line of text at a step)
    and :meth:`_finish`.

    Args:
        modules: also log each module's gradient norm (``trainguard/module_grad_norm/<module>``) for
            models with at most this many modules (0: never). Default 32.
    """

    def __init__(self, *, modules: int = 32) -> None:
        if not isinstance(modules, int) or isinstance(modules, bool) or modules < 0:
            raise ValueError(f"modules must be an integer >= 0, got {modules!r}")
        self.max_modules = modules
        self.nonfinite: Counter[str] = Counter()
        self.finding_counts: Counter[str] = Counter()
        self.action_counts: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []  # every finding/action/event, for the backends' tables
        self.closed = False

    # -- the backend's part --------------------------------------------------------------------
    def _scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _text(self, step: int, tag: str, text: str) -> None:
        raise NotImplementedError

    def _finish(self, summary: str | None) -> None:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    def scalars_of(self, s: StepStats) -> dict[str, float]:
        """One record's numbers for a backend: finite values, finite flags, counters."""
        out: dict[str, float] = {}
        bad_step = False

        def put(name: str, x: Any, flag: bool = True) -> None:
            nonlocal bad_step
            v = _num(x)
            if v is None:
                return
            ok = math.isfinite(v)
            if ok:
                out[f"{PREFIX}/{name}"] = v
            else:
                self.nonfinite[name] += 1
                bad_step = True
            if flag:
                out[f"{PREFIX}/finite/{name}"] = 1.0 if ok else 0.0
                out[f"{PREFIX}/nonfinite/{name}"] = float(self.nonfinite[name])

        if s.loss_known:
            put("loss", s.loss)
        put("grad_norm", s.grad_norm)
        put("param_norm", s.param_norm)
        put("lr", s.lr, flag=False)
        put("loss_scale", s.loss_scale, flag=False)
        if s.update_ratios:
            finite = [r for r in s.update_ratios if r is not None and math.isfinite(r)]
            if finite:
                out[f"{PREFIX}/update_ratio_max"] = max(finite)
        if s.scaler_overflow:
            out[f"{PREFIX}/scaler_overflow"] = 1.0
        for kind in ("nonfinite_buffers", "huge_param_modules", "nonfinite_optimizer_modules"):
            n = len(getattr(s, kind) or ())
            if n:
                out[f"{PREFIX}/{kind}"] = float(n)
                bad_step = True
        if self.max_modules and 0 < len(s.modules) <= self.max_modules:
            for m, g in zip(s.modules, s.grad_norms):
                if math.isfinite(g):
                    out[f"{PREFIX}/module_grad_norm/{m or '(root)'}"] = float(g)
        if bad_step:
            self.nonfinite["steps"] += 1
        out[f"{PREFIX}/nonfinite/steps"] = float(self.nonfinite["steps"])
        return out

    def on_stats(self, stats: StepStats) -> None:
        if not self.closed:
            self._scalars(stats.step, self.scalars_of(stats))

    def on_finding(self, f: Finding) -> None:
        if self.closed:
            return
        self.finding_counts[f.kind] += 1
        self.events.append({"step": f.step, "type": "finding", "kind": f.kind,
                            "severity": f.severity, "where": f.where or "", "text": f.message})
        self._scalars(f.step, {f"{PREFIX}/findings/{f.kind}": float(self.finding_counts[f.kind])})
        self._text(f.step, f"{PREFIX}/events", finding_text(f))

    def on_action(self, a: Action) -> None:
        if self.closed:
            return
        self.action_counts[a.kind] += 1
        self.events.append({"step": a.step, "type": "action", "kind": a.kind, "severity": "",
                            "where": "", "text": a.reason})
        self._scalars(a.step, {f"{PREFIX}/actions/{a.kind}": float(self.action_counts[a.kind])})
        self._text(a.step, f"{PREFIX}/events", action_text(a))

    def on_event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        if self.closed:
            return
        text = event_text(kind, step, data)
        self.events.append({"step": step, "type": "event", "kind": kind, "severity": "",
                            "where": "", "text": text})
        self._text(step, f"{PREFIX}/events", text)

    def close(self, summary: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self._finish(summary)
