"""Z10 - the Adam epsilon trap (Wortsman et al. 2023; Everett et al. 2024).

Adam's step is lr * m_hat / (sqrt(v_hat) + eps): invariant to the scale of the loss *except*
through eps. Multiply the loss by a tiny constant (a mis-set loss weight, a sum divided by N
twice) so that the per-coordinate gradient RMS falls far below eps = 1e-8 and the step
shrinks by ~RMS(g)/eps: training stalls although nothing is NaN, nothing spikes and the
gradients are perfectly healthy in direction (research/mechanisms.md section 5.1, Z10).

Setup: digits MLP 64-64-10 (ReLU), Adam lr 1e-3, batch 32, 300 steps, loss = 1e-9 * CE.
Unscaled, the gradient RMS is ~1e-2 (measured), so scaled it is ~1e-11 = 1e-3 * eps.
Criterion: held-out cross-entropy (unscaled) < 0.5; the unscaled control (or eps=1e-15)
reaches ~0.4, the bare run stays at ln(10) = 2.3.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, eval_ce, finite_run, minibatches, mlp, seed_all

LOSS_WEIGHT = 1e-9
THRESHOLD = 0.5


def build(seed: int, loss_weight: float = LOSS_WEIGHT, eps: float = 1e-8) -> Setup:
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp([64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=eps)
    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 32, seed),
                 loss_fn=lambda out, y: loss_weight * nn.functional.cross_entropy(out, y),
                 steps=300, evaluate=eval_ce(xte, yte))


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="adam_epsilon_trap", category="pathological",
    mechanism="Adam epsilon dominance: the loss is scaled by 1e-9, gradient RMS ~1e-11 << "
              "eps=1e-8, so every step shrinks ~1000x and training stalls",
    expected=("plateau",),
    source="Wortsman et al. 2023 (arXiv 2309.14322); Everett et al. 2024 (arXiv 2407.05872); "
           "research/mechanisms.md section 5.1 and Z10",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 300 steps (unscaled control ~0.4, bare 2.3)",
    build=build, passed=passed, repairable_online=False,
    prescription="Adam's eps dominates the second moment (sqrt(v_hat) < eps on most "
                 "coordinates): set eps to ~1e-3 x the gradient RMS (e.g. eps=1e-15 here), "
                 "remove the tiny loss weight, or use Adam-atan2 (eps-free)",
    fast=True,
))
