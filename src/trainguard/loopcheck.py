"""Cheap checks that the training loop drives the Guard as intended (issue #12, item 6).

Silent double updates and no-ops corrupt a run without any NaN:

* ``optimizer.step()`` left in the loop beside ``guard.step``: every batch is applied twice and
  a skip is not a skip. Seen by an optimizer step post-hook that counts the steps taken
  outside the Guard.
* ``guard.step`` called again without a new backward (stale gradients, or twice per batch):
  the same gradients are applied again. Seen by marking the gradient tensor the Guard last
  stepped on (a Python attribute) and its version counter: a new backward creates a new
  tensor (``zero_grad(set_to_none=True)``) or bumps the version (accumulation, ``zero_()``).
* ``guard.step`` without any backward: no parameter has a gradient.

Each is said once, as a ``RuntimeWarning`` and an event for the sinks; nothing is changed.
Cost per step: one attribute read and one comparison.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

_MARK = "_trainguard_step"

MESSAGES = {
    "double_update": ("optimizer.step() was called outside the Guard: remove it from the loop, "
                      "guard.step(loss) replaces it (otherwise every batch is applied twice and "
                      "a skip is not a skip)"),
    "stale_gradients": ("guard.step was called again without a new backward: the same gradients "
                        "would be applied twice (call optimizer.zero_grad() and loss.backward() "
                        "before each guard.step)"),
    "no_backward": ("guard.step was called but no parameter has a gradient: call "
                    "loss.backward() (scaler.scale(loss).backward() under AMP) first"),
}


class LoopCheck:
    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 report: Callable[[str, str], None]) -> None:
        self.params = params
        self.report = report
        self.external = 0
        self.inside = False
        self.warned: set[str] = set()
        self._first = 0  # the position of the first parameter that had a gradient
        self._handle: Any = None
        try:
            self._handle = optimizer.register_step_post_hook(self._on_step)
        except Exception:  # noqa: BLE001 - an optimizer wrapper without hooks: no such check
            self._handle = None

    def _on_step(self, *_: Any) -> None:
        if not self.inside:
            self.external += 1

    def _say(self, kind: str) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        warnings.warn(f"trainguard: {MESSAGES[kind]}", RuntimeWarning, stacklevel=4)
        self.report(kind, MESSAGES[kind])

    def _first_grad(self) -> torch.Tensor | None:
        """The first parameter's gradient that exists: the one found last time is looked at
        first (a frozen backbone ahead of the trained layers would be scanned twice a step)."""
        params = self.params
        i = self._first
        g = params[i].grad if i < len(params) else None
        if g is not None:
            return g
        for j, p in enumerate(params):
            if p.grad is not None:
                self._first = j
                return p.grad
        return None

    def before(self, step: int) -> None:
        """At the start of ``guard.step``."""
        if self.external:
            self.external = 0
            self._say("double_update")
        g = self._first_grad()
        if g is None:
            self._say("no_backward")
            return
        mark = getattr(g, _MARK, None)
        if mark is not None and mark == (step - 1, g._version):
            self._say("stale_gradients")

    def after(self, step: int) -> None:
        """At the end of ``guard.step`` (after the Guard's own in-place clip/unscale)."""
        g = self._first_grad()
        if g is not None:
            try:
                setattr(g, _MARK, (step, g._version))
            except (AttributeError, RuntimeError):  # pragma: no cover - exotic tensor types
                pass

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
