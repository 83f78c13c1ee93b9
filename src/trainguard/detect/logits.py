"""Output-logit drift: the softmax's common mode running away (Wortsman et al. 2023, §3.2).

The softmax is invariant to adding one constant to all logits, so nothing in a cross-entropy
loss holds the normaliser log Z = logsumexp(logits) in place; Adam without weight decay lets it
drift, "the logits diverge and become very negative". In fp32 a common offset is harmless; in
bf16/fp16 logits (8 / 11 significant bits) the differences between logits of magnitude ~256
are rounded to multiples of 1-2 and the softmax, which sees only differences, is blurred: the
held-out loss rises late in the run (PaLM's z-loss, Chowdhery et al. 2022, exists for it).

On sampled steps the activation sampler reads the mean log Z per row of the model's output
(``StepStats.output_log_z``) when it looks like logits (a floating tensor of 2 or 3 dimensions, last dimension >= 2). The
rule, kind ``divergence`` with ``evidence["cause"] = "logit_drift"``, fires when for
``patience`` = 3 consecutive probes |mean log Z| exceeds ``bar`` = 100 and moved further from 0
than at the previous probe:

* ``bar`` = 100: the zoo's Z13 runs with z-loss 1e-4 (the repaired configuration) keep log Z
  between -16 and -65 over 18,000 steps, the bare runs drift linearly (~-0.024 per step) to
  -314...-431 (seeds 0-4; research/mechanisms.md Z13); an untrained V-way classifier starts near
  log V (<= 11 for V <= 50,000). 100 is 1.5x the repaired runs' extreme; bf16's spacing is 0.5
  at |x| >= 64 and 1 at |x| >= 128, where a logit can no longer resolve the differences of a
  confident softmax.
* ``patience`` = 3 probes moving outward: a drift, not one odd batch.

The policy only reports it (``divergence:logit_drift`` has an empty ladder: a rollback or an
LR backoff cannot undo a slow common-mode drift); ``Policy(structural="repair")`` turns on
weight decay (:mod:`trainguard.remedies.structure`).
"""
from __future__ import annotations

import math

from ..types import Finding, StepStats
from .base import Detector, check_positive


class LogitDriftDetector(Detector):
    kind = "divergence"
    sampled = "output_log_z"
    _state = ("streak", "last", "reported")

    def __init__(self, bar: float = 100.0, patience: int = 3) -> None:
        check_positive("bar", bar)
        check_positive("patience", patience, integer=True)
        self.bar, self.patience = bar, patience
        self.streak = 0
        self.last: float | None = None
        self.reported = False

    def reset(self) -> None:
        self.streak, self.last = 0, None

    def update(self, s: StepStats) -> list[Finding]:
        v = s.output_log_z
        if v is None or self.reported or not math.isfinite(v):
            return []
        outward = self.last is not None and abs(v) > abs(self.last)
        self.streak = self.streak + 1 if abs(v) > self.bar and (outward or self.streak == 0) else 0
        self.last = v
        if self.streak < self.patience:
            return []
        self.reported = True
        return [Finding(
            kind="divergence", step=s.step, where="(output)",
            message=(f"the output logits' common mode is drifting: mean log Z = logsumexp(logits) "
                     f"is {v:.4g} and still moving away from 0 (softmax-invariant, so nothing in "
                     "the loss holds it; Adam without weight decay lets it run); harmless in "
                     "fp32, but bf16/fp16 logits of this size can no longer resolve the "
                     "differences the softmax sees"),
            evidence={"cause": "logit_drift", "log_z": v, "bar": self.bar},
            remedies=("add z-loss 1e-4 * log^2 Z to the loss (PaLM; Wortsman 2023)",
                      "weight decay on the output layer (AdamW weight_decay=0.1)",
                      "compute the output logits and the loss in fp32"),
        )]
