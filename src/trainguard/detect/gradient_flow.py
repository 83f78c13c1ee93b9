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
so cannot see this case. Modules without any gradient at a step are left out of it: their 0.0
is a convention, not a measured zero (an auxiliary head registered first and used only at
evaluation was reported as "exactly zero" at step 19 before).

Second rule, no gradient at all: a module whose parameters require a gradient but that got
none (``StepStats.missing_grad_modules``: the loss does not reach it) on ``patience`` = 20
consecutive steps while another module gets a finite, non-zero gradient is reported once, as
an information note (``vanishing_gradient``, ``evidence["cause"] = "no_gradient"``, no
action): a graph cut before it (a ``.detach()``, ``torch.no_grad()``,
``torch.utils.checkpoint(use_reentrant=True)`` on inputs that need no gradient) is a bug, a
module used only outside training steps is not, and only the user can tell; freezing it
(``requires_grad_(False)``) says which. Frozen modules (``StepStats.frozen_modules``) are never
reported. The 20 steps are the zero rule's patience: a mixture-of-experts expert that the
router leaves idle for 20 steps in a row is worth the note too.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..types import Finding, StepStats
from .base import Detector, check_positive
from .gradients import exploded


class ZeroGradientDetector(Detector):
    kind = "vanishing_gradient"
    _state = ("streak", "reported", "first_loss", "loss_ema", "missing_streak", "missing_run",
              "missing_reported")

    def __init__(self, patience: int = 20) -> None:
        check_positive("patience", patience, integer=True)
        self.patience = patience
        self.streak = 0
        self.reported = False
        self.missing_streak = 0  # consecutive steps some module wanting a gradient got none
        self.missing_run: list[str] = []  # the modules without one on every step of the streak
        self.missing_reported = False
        self._gone_cache: tuple[tuple[Sequence[str], Sequence[str]], set[str]] | None = None

    first_loss: float | None = None
    loss_ema: float | None = None

    def reset(self) -> None:
        self.streak = 0

    def update(self, s: StepStats) -> list[Finding]:
        out = self._no_gradient(s) if s.missing_grad_modules or self.missing_streak else []
        if exploded(self, s):  # dead units after an explosion, not a signal that never arrives
            self.streak = 0
            return out
        gn = s.grad_norms
        names = s.modules
        gone = self._gone(s) if s.missing_grad_modules or s.frozen_modules else None
        if len(gn) - (len(gone) if gone else 0) < 2 or not s.grads_finite \
                or not s.loss_finite or self.reported:
            return out
        first = gn[0] if not gone else next(v for m, v in zip(names, gn) if m not in gone)
        if first != 0.0:  # the common step: the first module gets a gradient
            self.streak = 0
            return out
        if gone:  # no gradient is not a zero gradient: those modules are left out
            kept = [(m, v) for m, v in zip(names, gn) if m not in gone]
            names, gn = [m for m, _ in kept], [v for _, v in kept]
        g = list(gn)
        first_live = next((i for i, v in enumerate(g) if v > 0), None)
        if first_live is None or not math.isfinite(g[first_live]):
            self.streak = 0
            return out
        self.streak += 1
        if self.streak < self.patience:
            return out
        self.reported = True
        zero = list(names[:first_live])
        live = names[first_live]
        return out + [Finding(
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

    def _gone(self, s: StepStats) -> set[str]:
        """The modules without a gradient at this step, as a set (the record's two tuples are
        the probe's same objects while the set of parameters with gradients stays the same:
        the set is built once for them)."""
        key = (s.missing_grad_modules, s.frozen_modules)
        cached = self._gone_cache
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1]:
            cached = self._gone_cache = (key, {*key[0], *key[1]})
        return cached[1]

    def _no_gradient(self, s: StepStats) -> list[Finding]:
        """The second rule: modules that want a gradient and got none, ``patience`` steps in a
        row, while another module gets a finite, non-zero one (an information note, once)."""
        if self.missing_reported:
            return []
        gone = set(s.missing_grad_modules)
        live = s.grads_finite and any(v > 0 for m, v in zip(s.modules, s.grad_norms)
                                      if m not in gone)
        run = [m for m in (self.missing_run if self.missing_streak else s.modules) if m in gone]
        if not run or not live:
            self.missing_streak, self.missing_run = 0, []
            return []
        self.missing_streak += 1
        self.missing_run = run
        if self.missing_streak < self.patience:
            return []
        self.missing_reported = True
        named = ", ".join(run[:3]) + (" ..." if len(run) > 3 else "")
        return [Finding(
            kind="vanishing_gradient", step=s.step, where=run[0], locations=tuple(run),
            severity="info",
            message=(f"{named} received no gradient for {self.missing_streak} steps although "
                     f"{'their' if len(run) > 1 else 'its'} parameters require one: the loss "
                     f"does not reach {'them' if len(run) > 1 else 'it'} (used only outside "
                     "training steps, or the graph is cut before)"),
            evidence={"cause": "no_gradient", "modules": run, "steps": self.missing_streak},
            remedies=("if it is not meant to train, freeze it (module.requires_grad_(False)) "
                      "or leave it out of the optimizer",
                      "else find where the graph is cut: a .detach(), torch.no_grad(), "
                      "torch.utils.checkpoint with use_reentrant=True on inputs that need no "
                      "gradient (use_reentrant=False)"),
        )]
