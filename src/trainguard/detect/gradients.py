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
* **Through time** (recurrent modules, ``nn.RNN``/``nn.GRU``/``nn.LSTM``): on sampled steps the
  probe measures the gradient reaching the module's first input step against the one reaching
  its last, ``||dL/dx_0|| / ||dL/dx_T-1||``. The median of the last ``time_window`` = 5
  probes (those within ``time_settle`` = 50 steps of the module's first probe excluded, from
  the third on) below ``time_ratio`` = 1e-4 (the same 1e-4 as the backward rule) is
  vanishing through time (Bengio et al. 1994;
  Pascanu et al. 2013). Per-module gradient norms cannot see it: the recurrent weights get
  their gradient from the last few steps. Measured (zoo ``recurrent_vanishing_rnn``, tanh RNN
  rho = 0.9, T = 100): median ~1e-5, single probes 2e-10 to 2e-2; its GRU repair starts at
  1e-10 but opens the path within 100-200 steps (2e-2, then >= 1) - hence the median and
  the settling span. 50 steps: one probe interval at the default ``sample_every``, so at that
  cadence only the probe at initialisation is skipped (as before: the RNN is still reported
  at step 150); it matters after a structural repair swaps in a GRU mid-run, whose new
  module is probed every 5 steps at first (a close watch) while its path is still shut;
  healthy LSTM on the adding problem: see docs/zoo.md.

None of the rules reports while the loss sits far above its first value (see :func:`exploded`).
"""
from __future__ import annotations

import math

from ..types import Finding, StepStats
from .base import Detector, check_positive


def exploded(d: Detector, s: StepStats) -> bool:
    """The loss (EMA 0.9, kept in ``d.first_loss`` / ``d.loss_ema``) sits above 1.5x its first
    value: small or zero gradients now are the aftermath of an explosion (saturated gates,
    units killed by a huge step), not vanishing gradients, which keep the loss near its start
    (issue #9: an LSTM LM at SGD lr 100 sat at 30-100 nats from 6.3 and was called
    vanishing; an IRNN blown up at step 1 had exactly zero gradients in its dead units)."""
    if not s.loss_usable:
        return False
    if d.first_loss is None:  # type: ignore[attr-defined]
        d.first_loss = s.loss  # type: ignore[attr-defined]
    ema = d.loss_ema  # type: ignore[attr-defined]
    d.loss_ema = s.loss if ema is None else 0.9 * ema + 0.1 * s.loss  # type: ignore[attr-defined]
    return d.first_loss > 0 and d.loss_ema > 1.5 * d.first_loss  # type: ignore[attr-defined]


class VanishingGradientDetector(Detector):
    kind = "vanishing_gradient"
    _state = ("streak", "reported", "forward_reported", "time_seen", "time_reported",
              "time_first", "first_loss", "loss_ema")

    def __init__(self, ratio: float = 1e-4, patience: int = 20,
                 forward_ratio: float = 1e-4, time_ratio: float = 1e-4,
                 time_window: int = 5, time_settle: int = 50) -> None:
        check_positive("ratio", ratio)
        check_positive("patience", patience, integer=True)
        check_positive("forward_ratio", forward_ratio)
        check_positive("time_ratio", time_ratio)
        check_positive("time_window", time_window, integer=True)
        self.ratio, self.patience, self.forward_ratio = ratio, patience, forward_ratio
        check_positive("time_settle", time_settle, integer=True)
        self.time_ratio, self.time_window, self.time_settle = time_ratio, time_window, time_settle
        self.streak = 0
        self.reported = False
        self.forward_reported = False
        self.time_seen: dict[str, list[float]] = {}  # module -> ratios after settling
        self.time_first: dict[str, int] = {}  # module -> the step of its first probe
        self.time_reported: list[str] = []
        self.first_loss: float | None = None
        self.loss_ema: float | None = None

    def reset(self) -> None:
        self.streak = 0

    def _backward(self, s: StepStats) -> list[Finding]:
        if len(s.grad_norms) < 2 or not s.grads_finite:
            return []
        top = max(s.grad_norms)
        if top > 0 and min(s.grad_norms) >= self.ratio * top:
            # the common step, decided without the search below: every module's norm, the
            # first live one's included, is at least ``ratio`` of the largest
            self.streak = 0
            self.reported = False
            return []
        first_i = next((i for i, g in enumerate(s.grad_norms) if g > 0), None)
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

    def _through_time(self, s: StepStats) -> list[Finding]:
        out: list[Finding] = []
        for name, a in (s.activations or {}).items():
            r = a.get("time_grad_ratio") if a.get("kind") == "recurrent" else None
            if r is None or not math.isfinite(r) or name in self.time_reported:
                continue
            first = self.time_first.setdefault(name, s.step)
            if s.step - first < self.time_settle:
                continue  # the probe at initialisation, and those while the cell settles
            seen = self.time_seen.setdefault(name, [])
            seen.append(float(r))
            del seen[:-self.time_window]  # the last few
            recent = sorted(seen)
            if len(recent) < 3:
                continue
            med = recent[len(recent) // 2]
            if med >= self.time_ratio:
                continue
            self.time_reported.append(name)
            out.append(Finding(
                kind="vanishing_gradient", step=s.step, where=name,
                message=(f"the gradient reaching the first of {a.get('steps')} time steps of {name} "
                         f"is {med:.1e} of the one reaching the last (median of {len(recent)} "
                         "probes): long-range dependencies cannot be learned"),
                evidence={"through_time": True, "time_grad_ratio": med, "probes": recent,
                          "steps": a.get("steps")},
                remedies=("use a gated cell (GRU/LSTM) instead of a vanilla RNN",
                          "orthogonal recurrent init with spectral radius ~1; shorter sequences "
                          "(truncated BPTT) or skip connections through time"),
            ))
        return out

    def update(self, s: StepStats) -> list[Finding]:
        if exploded(self, s):
            self.streak = 0
            return []
        if not s.activations:  # the forward and through-time rules read sampled steps only
            return self._backward(s)
        return self._forward(s) + self._backward(s) + self._through_time(s)
