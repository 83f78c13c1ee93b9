"""Stalls caused by the optimizer's numerics rather than by the loss landscape.

Both rules read statistics sampled after an update (``StepStats.optimizer_state``) and report
kind ``plateau`` (the symptom users see) with the cause named in the message and in
``evidence["cause"]``, on ``patience`` = 2 consecutive probes:

* **Adam epsilon trap** (cause ``adam_epsilon``): at least ``eps_fraction`` = 0.9 of the
  coordinates that ever received a gradient have ``sqrt(v_hat) < eps``. Adam is invariant to
  the gradient's scale except through eps, so its steps then shrink by ~sqrt(v_hat)/eps
  (Wortsman et al. 2023, arXiv 2309.14322; research/mechanisms.md Z10 expects ~100%).
  Coordinates with v = 0 (never-used embedding rows) are not counted.
* **Low-precision update swamping** (cause ``update_swamping``): at least ``swamp_fraction`` =
  0.5 of the non-zero gradients of 16-bit parameters left the stored weight unchanged: the
  update was below half an ulp (|dw| < |w| * 2^-9 in bf16; Zamirai et al. 2020, arXiv
  2010.06192; mechanisms.md Z18 expects ~100% for unit-scale weights). fp32 parameters are
  not judged (their swamping needs |dw| < 6e-8 |w|, which means vanishing gradients, a
  different finding).
"""
from __future__ import annotations

from ..types import Finding, StepStats
from .base import Detector, check_positive


class OptimizerStallDetector(Detector):
    kind = "plateau"
    sampled = "optimizer_state"
    _state = ("eps_streak", "swamp_streak", "reported")

    def __init__(self, eps_fraction: float = 0.9, swamp_fraction: float = 0.5,
                 patience: int = 2) -> None:
        for name, v in (("eps_fraction", eps_fraction), ("swamp_fraction", swamp_fraction)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        check_positive("patience", patience, integer=True)
        self.eps_fraction, self.swamp_fraction, self.patience = eps_fraction, swamp_fraction, patience
        self.eps_streak = 0
        self.swamp_streak = 0
        self.reported: list[str] = []

    def update(self, s: StepStats) -> list[Finding]:
        st = s.optimizer_state
        if not st:
            return []
        out: list[Finding] = []
        e = st.get("eps_dominated_fraction")
        if e is not None:
            self.eps_streak = self.eps_streak + 1 if e >= self.eps_fraction else 0
            if self.eps_streak >= self.patience and "adam_epsilon" not in self.reported:
                self.reported.append("adam_epsilon")
                eps = st.get("eps")
                out.append(Finding(
                    kind="plateau", step=s.step, severity="warning",
                    message=(f"{e:.0%} of the optimizer's coordinates have sqrt(v_hat) below "
                             f"eps={eps:g}: Adam's steps are throttled by epsilon and training "
                             "stalls (the gradients are tiny, e.g. a loss scaled by a small "
                             "constant)"),
                    evidence={"cause": "adam_epsilon", "eps_dominated_fraction": e, "eps": eps},
                    remedies=("lower Adam's eps (1e-8 -> 1e-15) or scale it with the gradient "
                              "RMS (Wortsman 2023; Everett 2024: Adam-atan2 removes eps)",
                              "check for a loss multiplied by a tiny constant"),
                ))
        w = st.get("swamped_fraction")
        if w is not None:
            self.swamp_streak = self.swamp_streak + 1 if w >= self.swamp_fraction else 0
            if self.swamp_streak >= self.patience and "update_swamping" not in self.reported:
                self.reported.append("update_swamping")
                out.append(Finding(
                    kind="plateau", step=s.step, severity="warning",
                    message=(f"{w:.0%} of the non-zero updates to 16-bit parameters were lost to "
                             "rounding (each update is below half an ulp of its weight): the "
                             "weights cannot move"),
                    evidence={"cause": "update_swamping", "swamped_fraction": w},
                    remedies=("keep fp32 master weights (autocast instead of .half()/.bfloat16() "
                              "parameters)", "use Kahan-compensated or stochastically rounded "
                              "updates (Zamirai 2020)"),
                ))
        return out
