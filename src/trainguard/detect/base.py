"""Shared pieces for detectors: the Detector protocol and small running statistics.

Detectors are pure: a stream of :class:`~trainguard.types.StepStats` in, findings out.
They never import torch, and their whole state is a plain dict (``state_dict``).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable

import numpy as np

from ..types import Finding, StepStats


class Detector:
    """Base class: override :meth:`update`; state lives in attributes listed in ``_state``."""

    kind: str = ""
    _state: tuple[str, ...] = ()
    #: the one sampled StepStats field this detector reads (``"activations"``,
    #: ``"optimizer_state"``, ``"output_log_z"``), when it reads nothing else: its ``update``
    #: returns no finding and changes no state while that field is empty, so the decision core
    #: does not call it then (most steps). None: called every step.
    sampled: str | None = None

    def update(self, s: StepStats) -> list[Finding]:  # pragma: no cover - interface
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the running statistics (called after a rollback restores old weights)."""

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._state:
            v = getattr(self, name)
            if isinstance(v, deque):
                v = list(v)
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            out[name] = v
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._state:
            if name not in state:
                continue
            cur = getattr(self, name)
            v = state[name]
            if isinstance(cur, deque):
                v = deque(v, maxlen=cur.maxlen)
            elif isinstance(cur, np.ndarray) or (cur is None and isinstance(v, list)):
                v = np.asarray(v, dtype=float)
            setattr(self, name, v)

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_")
                  and k not in self._state and isinstance(v, (int, float, str, bool))}
        inner = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return f"{type(self).__name__}({inner})"


class ChanceAware:
    """A detector that reads the loss's uninformed-guess level (``self.chance``, ln V for a
    V-way cross-entropy, or None), which the decision core sets when it knows it."""

    chance: float | None = None

    def set_chance(self, chance: float | None) -> None:
        """Tell the detector the loss is a cross-entropy whose uninformed-guess level is
        ``chance`` (ln V for V classes); None forgets it."""
        if chance is not None and not (isinstance(chance, (int, float)) and math.isfinite(chance)
                                       and chance > 0):
            raise ValueError(f"chance must be a positive finite loss level (ln V), got {chance!r}")
        self.chance = None if chance is None else float(chance)


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    """Raise ValueError naming the parameter when ``value`` is not a positive number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def robust_center_scale(values: Iterable[float]) -> tuple[float, float]:
    """Median and MAD-based standard deviation (1.4826 * MAD, consistent for a Gaussian)."""
    a = np.fromiter(values, dtype=float)
    med = float(np.median(a))
    mad = float(np.median(np.abs(a - med)))
    return med, 1.4826 * mad
