"""Z8 - Adam's learning rate too high (Cohen et al. 2022, adaptive edge of stability;
research/mechanisms.md 3.1 and Z8).

Setup: MLP 64-128-128-10 (ReLU) on digits, batch 64, Adam beta1 0.9, beta2 0.999 at lr = LR,
far above the working range (1e-3 to 3e-3 for this model; Wortsman et al. 2023's LR
sensitivity sweep spans 3e-4 to 3e-1). The preconditioned sharpness exceeds Adam's limit
38/eta at once: the loss jumps in the first steps, ReLU units die and training ends far
above the healthy reference.

Criterion: held-out cross-entropy < 0.35 after 300 steps (the same model at lr 1e-3 reaches
~0.1, see ``healthy_mlp_adam``). Not repairable online: the ReLU units die in the first
steps, before any history exists to judge a spike against (the Guard names dead_units at the
first sampled probe, step 50).
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import Scenario, Setup, register
from ._common_a import below, digits, eval_ce, minibatches, mlp, seed_all

THRESHOLD = 0.35
LR = 0.1


def build(seed: int, lr: float = LR, act=nn.ReLU) -> Setup:
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp([64, 128, 128, 10], act)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 64, seed),
                 loss_fn=nn.functional.cross_entropy, steps=300, evaluate=eval_ce(xte, yte))


register(Scenario(
    name="curvature_adam_lr_too_high", category="pathological",
    mechanism=f"Adam at lr {LR}, ~100x the working LR: preconditioned sharpness past 38/eta",
    expected=("divergence", "loss_spike", "grad_explosion", "dead_units"),
    source="Cohen et al. 2022 (arXiv 2207.14484); Wortsman et al. 2023 (arXiv 2309.14322); "
           "research/mechanisms.md 3.1 and Z8",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 300 steps",
    build=build, passed=below(THRESHOLD), repairable_online=False,
    prescription="lower the learning rate to the LR range test's choice (~1e-3 here) and add warmup; "
                 "the damage (dead ReLU units) is done in the first steps, before any history "
                 "exists to judge a spike against",
    reference=THRESHOLD))
