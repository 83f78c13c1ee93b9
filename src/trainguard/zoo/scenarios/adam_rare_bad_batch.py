"""Z14 - one rare bad batch poisons Adam's state (PaLM 2022; OLMo 2; SPAM 2025).

A single batch whose gradient is ~1000x the usual one (here: a batch of inputs in the wrong
units, x1000, with misaligned labels, as from a corrupt shard) enters Adam's moments. The first moment moves
the weights a long way in one arbitrary direction, and the second moment, inflated ~1e6x
times (1 - beta2), keeps every later step ~30x too small for thousands of steps
(v decays like beta2^t: ln(1000)/(1 - beta2) ~ 7000 steps at beta2 = 0.999). The loss spikes
at the bad step and training crawls afterwards (research/mechanisms.md sections 5.3, 5.9, Z14).

Setup: digits MLP 64-128-10, Adam lr 1e-3 beta2 0.999, batch 32, 600 steps, the batch at
step 150 has its inputs multiplied by 1000 and its labels shifted by one sample.
Criterion: held-out cross-entropy < THRESHOLD, set between the no-injection control and the
bare run. Calibration (seeds 0-2): no injection 0.15-0.16, bare 0.51-0.65, guarded (skip at
step 150) 0.21-0.22.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, eval_ce, finite_run, minibatches, mlp, seed_all

BAD_STEP = 150
BAD_FACTOR = 1000.0
THRESHOLD = 0.3


def build(seed: int, factor: float = BAD_FACTOR) -> Setup:
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp([64, 128, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))

    def corrupt(step: int, xb: torch.Tensor, yb: torch.Tensor):
        if step == BAD_STEP:  # wrong units and misaligned labels: a corrupt shard
            return xb * factor, yb.roll(1)
        return xb, yb

    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 32, seed, corrupt),
                 loss_fn=nn.functional.cross_entropy, steps=600, evaluate=eval_ce(xte, yte))


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="adam_rare_bad_batch", category="pathological",
    mechanism="one batch with ~1000x the usual gradient (inputs in the wrong units) throws "
              "the weights and inflates Adam's second moment, which then slows every later "
              "step for thousands of steps",
    expected=("loss_spike", "grad_explosion"),
    source="Chowdhery et al. 2022 (PaLM, arXiv 2204.02311); OLMo 2 (arXiv 2501.00656); "
           "Huang et al. 2025 (SPAM, arXiv 2501.06842); research/mechanisms.md Z14",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 600 steps",
    build=build, passed=passed, repairable_online=True, fast=True,
))
