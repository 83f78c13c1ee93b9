"""A NaN in the input data: one batch carries a NaN feature at step k.

The NaN flows through the forward pass into the loss and every gradient; one plain optimizer
step writes NaN into the weights and the run is lost for good (every later loss is NaN).
Skipping the step (PyTorch GradScaler's design, optax ``apply_if_finite``) is the whole cure.

Setup: digits MLP 64-64-10, SGD lr 0.1 momentum 0.9, batch 32, 400 steps; at step 120 one
pixel of one sample is NaN (a corrupt record in the data pipeline).
Criterion: the run stays finite and held-out cross-entropy < 0.3.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, eval_ce, minibatches, mlp, seed_all

BAD_STEP = 120
THRESHOLD = 0.3


def build(seed: int, bad_step: int | None = BAD_STEP) -> Setup:
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp([64, 64, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def corrupt(step: int, xb: torch.Tensor, yb: torch.Tensor):
        if step == bad_step:
            xb = xb.clone()
            xb[3, 17] = math.nan
        return xb, yb

    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 32, seed, corrupt),
                 loss_fn=nn.functional.cross_entropy, steps=400, evaluate=eval_ce(xte, yte))


def passed(r: RunResult) -> bool:
    # The final metric must be finite; a NaN loss on the bad batch itself is the data's fault
    # and is allowed, but nothing may stay NaN afterwards.
    tail = r.losses[BAD_STEP + 1:] if len(r.losses) > BAD_STEP + 1 else r.losses
    return (r.finished and all(math.isfinite(v) for v in tail) and math.isfinite(r.metric)
            and r.metric < THRESHOLD)


register(Scenario(
    name="data_nan_input", category="pathological",
    mechanism="a NaN feature in one input batch turns the loss and all gradients into NaN; "
              "one optimizer step writes NaN into every weight",
    expected=("nonfinite",),
    source="PyTorch GradScaler / optax apply_if_finite (skip non-finite updates); "
           "research/mechanisms.md section 6.2 ('on inf/NaN skip the update')",
    criterion=f"every loss after the bad step is finite and held-out cross-entropy < {THRESHOLD}",
    build=build, passed=passed, repairable_online=True, fast=True,
))
