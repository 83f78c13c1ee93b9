"""Z15 - a batch too small for the learning rate (McCandlish et al. 2018).

The learning rate was tuned at batch 512 and the run uses batch 2 with the same LR. The
optimal step shrinks as eps_opt(B) = eps_max / (1 + B_noise / B): with B far below the noise
scale, each minibatch gradient is mostly noise and the large step carries the weights away
(noisy, non-decreasing loss, or outright divergence). Here the oversized noisy steps kill the
whole hidden ReLU layer within 50 steps (measured), so the run never recovers.
Calibration (seeds 0-2): batch 2 ends at 2.6-3.2; batch 512 at the same LR reaches 0.15-0.17;
batch 2 with lr 0.02 reaches 0.30-0.33.
(research/mechanisms.md section 4.1, Z15)

Under the Guard the divergence rules name it within the first 10 steps. At batch 2, units
killed short of the whole layer are not judged (DeadUnitsDetector.min_rows: on 2 rows a living
layer reads as dying), so dead_units appears only when the whole layer dies.

Setup: digits MLP 64-64-10, SGD lr LR (momentum 0.9), 400 steps at batch 2.
Criterion: held-out cross-entropy < THRESHOLD; the same LR at batch 512 reaches ~0.1.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, eval_ce, finite_run, minibatches, mlp, seed_all

LR = 0.5
THRESHOLD = 0.5


def build(seed: int, batch: int = 2, lr: float = LR, steps: int = 400) -> Setup:
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp([64, 64, 10])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, batch, seed),
                 loss_fn=nn.functional.cross_entropy, steps=steps, evaluate=eval_ce(xte, yte))


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="data_small_batch", category="pathological",
    mechanism="learning rate tuned at batch 512 used at batch 2: gradient noise dominates, "
              "the oversized noisy steps kill the whole ReLU layer and the loss ends above "
              "chance",
    expected=("divergence", "dead_units"),
    source="McCandlish et al. 2018 (arXiv 1812.06162); research/mechanisms.md section 4.1, Z15",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 400 steps at batch 2",
    build=build, passed=passed, repairable_online=True,
    prescription="lower the LR for the small batch: eps_opt(B) = eps_max/(1 + B_noise/B), "
                 "or accumulate gradients up to B ~ B_noise",
))
