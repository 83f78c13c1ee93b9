"""Learning-rate backoff that cooperates with any torch LR scheduler.

The Guard never rewrites the scheduled learning rate. It holds a scale ``s <= 1`` and applies
it only *around* ``optimizer.step()``: each group's ``lr`` is multiplied by ``s`` just before
the step and restored just after. Schedulers (chainable or closed-form, ReduceLROnPlateau
included) therefore keep reading and writing their own values and never fight the Guard.

On a backoff the scale is multiplied by ``factor`` (0.5) and a ceiling is set at
``failing_scale * sqrt(factor)`` (0.71 of the scale that failed): a learning rate that
diverged is not returned to in full. A backoff for a finding that names the learning rate as
its cause (a loss ruined right after the first updates or an LR increase) sets the ceiling at
the new scale: that LR is not returned to at all. After ``quiet`` = 50 steps without a severe finding the
scale grows by ``growth`` = 2% per step back to the ceiling (about 35 steps to double).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # the scale arithmetic is torch-free (the NumPy Monitor uses it)
    import torch


class LRController:
    def __init__(self, factor: float = 0.5, quiet: int = 50, growth: float = 1.02,
                 min_scale: float = 1 / 1024) -> None:
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        if not growth >= 1:
            raise ValueError(f"growth must be >= 1, got {growth!r}")
        self.factor, self.quiet, self.growth, self.min_scale = factor, quiet, growth, min_scale
        self.scale = 1.0
        self.ceiling = 1.0
        self.since_trouble = 0

    def can_backoff(self, factor: float | None = None) -> bool:
        return self.scale * (self.factor if factor is None else factor) >= self.min_scale

    def backoff(self, factor: float | None = None, recover: bool = True) -> tuple[float, float]:
        """Multiply the scale by ``factor`` (default: the controller's own). With
        ``recover=False`` the new scale is also the ceiling: the scale never grows back (an
        LR that ruined the loss is not returned to, not even to ``sqrt(factor)`` of it)."""
        f = self.factor if factor is None else factor
        if not 0 < f < 1:
            raise ValueError(f"factor must be in (0, 1), got {f!r}")
        before = self.scale
        self.ceiling = min(self.ceiling, before * (math.sqrt(f) if recover else f))
        self.scale = before * f
        self.since_trouble = 0
        return before, self.scale

    def tick(self, troubled: bool) -> None:
        """Called once per step: recover the scale after a quiet period."""
        if troubled:
            self.since_trouble = 0
            return
        self.since_trouble += 1
        if self.since_trouble > self.quiet and self.scale < self.ceiling:
            self.scale = min(self.ceiling, self.scale * self.growth)

    @contextmanager
    def applied(self, optimizer: "torch.optim.Optimizer") -> Iterator[None]:
        if self.scale == 1.0:
            yield
            return
        saved = [g["lr"] for g in optimizer.param_groups]
        try:
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.scale  # a float or a tensor LR alike
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    def state_dict(self) -> dict:
        return {"scale": self.scale, "ceiling": self.ceiling, "since_trouble": self.since_trouble}

    def load_state_dict(self, s: dict) -> None:
        self.scale, self.ceiling, self.since_trouble = s["scale"], s["ceiling"], s["since_trouble"]
