"""Gradient that never arrives: input-side modules whose gradient is *exactly* zero.

Rule: the first (input-side) module's gradient norm is exactly 0.0 while a module closer to
the output has a finite, non-zero gradient, on ``patience`` = 20 consecutive steps (the
patience of :mod:`.gradients`, so one odd batch stays quiet). Reported once per run as
``vanishing_gradient``: the backward signal does not reach the first layers at all.

Why exactly zero: a float gradient norm is exactly 0 only when every element is 0, which
healthy training never produces for a whole module (0 of 15,000 steps of the healthy digits
runs listed in tests/test_zoo_b.py). It happens when activation gradients underflow (fp16
flushes |g| < 2^-24 = 5.96e-8 to zero without loss scaling; Micikevicius et al. 2018,
research/mechanisms.md section 6.1: 67% zero activation gradients in SSD), when a whole layer
of ReLUs is dead (Lu et al. 2019), or when the graph is cut (a stray ``.detach()``).
:class:`.gradients.VanishingGradientDetector` measures ratios between *non-zero* norms and
so cannot see this case. Modules without any gradient at a step (frozen parameters left in
the optimizer, a branch the loss did not use: ``StepStats.missing_grad_modules``) are left
out: their 0.0 is a convention, not a measured zero (an auxiliary head registered first and
used only at evaluation was reported as a vanishing gradient at step 19 before).
"""
from __future__ import annotations

import math

from ..types import Finding, StepStats
from .base import Detector, check_positive
from .gradients import exploded


class ZeroGradientDetector(Detector):
    kind = "vanishing_gradient"
    _state = ("streak", "reported", "first_loss", "loss_ema")

    def __init__(self, patience: int = 20) -> None:
        check_positive("patience", patience, integer=True)
        self.patience = patience
        self.streak = 0
        self.reported = False

    first_loss: float | None = None
    loss_ema: float | None = None

    def reset(self) -> None:
        self.streak = 0

    def update(self, s: StepStats) -> list[Finding]:
        if exploded(self, s):  # dead units after an explosion, not a signal that never arrives
            self.streak = 0
            return []
        gn = s.grad_norms
        names = s.modules
        if s.missing_grad_modules:  # no gradient at all is not a gradient of zero
            missing = set(s.missing_grad_modules)
            kept = [(m, v) for m, v in zip(names, gn) if m not in missing]
            names, gn = [m for m, _ in kept], [v for _, v in kept]
        if len(gn) < 2 or not s.grads_finite or not s.loss_finite or self.reported:
            return []
        if gn[0] != 0.0:  # the common step: the first module gets a gradient
            self.streak = 0
            return []
        g = list(gn)
        first_live = next((i for i, v in enumerate(g) if v > 0), None)
        if first_live is None or not math.isfinite(g[first_live]):
            self.streak = 0
            return []
        self.streak += 1
        if self.streak < self.patience:
            return []
        self.reported = True
        zero = list(names[:first_live])
        live = names[first_live]
        return [Finding(
            kind="vanishing_gradient", step=s.step, where=zero[0], locations=tuple(zero),
            message=(f"the gradient of {', '.join(zero[:3])}{' ...' if len(zero) > 3 else ''} "
                     f"has been exactly zero for {self.streak} steps while {live} still gets "
                     f"{g[first_live]:.2e}: the backward signal never arrives (fp16 "
                     "underflow without loss scaling, a fully dead layer, or a detached graph)"),
            evidence={"zero_modules": zero, "first_live_module": live,
                      "first_live_norm": g[first_live], "steps": self.streak},
            remedies=("in fp16, use loss scaling (torch.amp.GradScaler) or bf16",
                      "check for dead ReLU layers (see dead_units) and stray .detach()"),
        )]
