"""Vanishing gradients and forward-signal collapse.

Two signals, either one is enough:

* **Backward**: the gradient norm of the first (input-side) module with a non-zero gradient
  is below ``ratio`` = 1e-4 of the largest module gradient norm, for ``patience`` = 20
  consecutive steps. 1e-4 is the heuristic of research/mechanisms.md §2.11: a depth-10 sigmoid
  MLP with the pre-2010 init measures 1.2e-9, healthy nets 1e-2 to 1 (AUTOTRAINER uses 1e-3
  for the same ratio, Zhang et al. ICSE 2021). The 20-step patience keeps one odd batch quiet.
* **Forward**: on a sampled step, the activation second moment of the last hooked activation
  layer is below ``forward_ratio`` = 1e-4 of the first one's. A ReLU MLP with Xavier init at
  depth 30 loses a factor ~1e-9 (He et al. 2015; mechanisms.md §2.2), an ordered-phase tanh
  net ~1e-6 (§2.10); 1e-4 (a 100x drop in standard deviation) leaves room for healthy nets
  whose raw, unnormalised inputs make the first layer's moment large.
"""
from __future__ import annotations

import math

from ..types import Finding, StepStats
from .base import Detector, check_positive


class VanishingGradientDetector(Detector):
    kind = "vanishing_gradient"
    _state = ("streak", "reported", "forward_reported")

    def __init__(self, ratio: float = 1e-4, patience: int = 20,
                 forward_ratio: float = 1e-4) -> None:
        check_positive("ratio", ratio)
        check_positive("patience", patience, integer=True)
        check_positive("forward_ratio", forward_ratio)
        self.ratio, self.patience, self.forward_ratio = ratio, patience, forward_ratio
        self.streak = 0
        self.reported = False
        self.forward_reported = False

    def reset(self) -> None:
        self.streak = 0

    def _backward(self, s: StepStats) -> list[Finding]:
        if len(s.grad_norms) < 2 or not s.grads_finite:
            return []
        first_i = next((i for i, g in enumerate(s.grad_norms) if g > 0), None)
        top = max(s.grad_norms)
        if first_i is None or top <= 0 or first_i == len(s.grad_norms) - 1:
            self.streak = 0
            return []
        r = s.grad_norms[first_i] / top
        if r >= self.ratio:
            self.streak = 0
            self.reported = False
            return []
        self.streak += 1
        if self.streak < self.patience or self.reported:
            return []
        self.reported = True
        first = s.modules[first_i]
        top_name = s.modules[list(s.grad_norms).index(top)]
        return [Finding(
            kind="vanishing_gradient", step=s.step, where=first,
            locations=(first, top_name),
            message=(f"the gradient reaching {first} is {r:.1e} of the largest one "
                     f"({top_name}) for {self.streak} steps: the first layers barely learn"),
            evidence={"ratio": r, "first_module": first, "first_norm": s.grad_norms[first_i],
                      "top_module": top_name, "top_norm": top, "steps": self.streak},
        )]

    def _forward(self, s: StepStats) -> list[Finding]:
        acts = s.activations
        if not acts or self.forward_reported:
            return []
        named = [(n, a["second_moment"]) for n, a in acts.items()
                 if a.get("second_moment") is not None and math.isfinite(a["second_moment"])]
        if len(named) < 2:
            return []
        (n0, q0), (n1, q1) = named[0], named[-1]
        if q0 <= 0 or q1 / q0 >= self.forward_ratio:
            return []
        self.forward_reported = True
        return [Finding(
            kind="vanishing_gradient", step=s.step, where=n1, locations=(n0, n1),
            message=(f"the forward signal collapses with depth: mean square activation "
                     f"{q0:.2e} at {n0} but {q1:.2e} at {n1} ({q1 / q0:.1e}); backpropagated "
                     "gradients shrink with it (init too small for this activation)"),
            evidence={"first_module": n0, "first_second_moment": q0, "last_module": n1,
                      "last_second_moment": q1, "ratio": q1 / q0},
        )]

    def update(self, s: StepStats) -> list[Finding]:
        return self._forward(s) + self._backward(s)
