"""Z16 - fp16 overflow in a hand-written softmax (Micikevicius et al. 2018), emulated on CPU.

The loss computes softmax as exp(z) / sum(exp(z)) in half precision, without subtracting
the max (a custom attention/softmax kernel, or a hand-written loss under ``.half()``). fp16's
largest finite value is 65504, so exp(z) overflows to inf as soon as a logit exceeds
ln(65504) = 11.09 (research/mechanisms.md sections 6.1 and 6.3): the probability becomes
inf/inf = NaN. A classifier crosses that point as soon as it becomes confident, so the run
dies mid-training. fp16 is emulated by rounding through ``torch.float16``
(``y.to(torch.float16).to(torch.float32)``), which keeps overflow-to-inf.

Setup: digits MLP 64-64-10, Adam lr 1e-2, batch 32, 300 steps.
Criterion: the run finishes with finite weights and held-out cross-entropy (fp32) < 0.3.
Skipping the overflowing steps and backing off the LR (the Guard's ladder) keeps the weights
finite and slows the logit growth, so the guarded run passes within this budget; the cause
(fp16 softmax) stays and the prescription says how to remove it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, eval_ce, minibatches, mlp, seed_all

THRESHOLD = 0.3


def fp16(t: torch.Tensor) -> torch.Tensor:
    """Round through IEEE half precision (overflow -> inf, underflow -> 0)."""
    return t.to(torch.float16).to(torch.float32)


def naive_fp16_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    e = fp16(torch.exp(fp16(z)))                     # overflows past z = 11.09
    p = fp16(e / fp16(e.sum(dim=1, keepdim=True)))
    return -torch.log(p.gather(1, y[:, None]).clamp_min(2.0 ** -24)).mean()


def stable_fp32_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(z, y)


def build(seed: int, stable: bool = False) -> Setup:
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp([64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 32, seed),
                 loss_fn=stable_fp32_ce if stable else naive_fp16_ce, steps=300,
                 evaluate=eval_ce(xte, yte))


def passed(r: RunResult) -> bool:
    return r.finished and math.isfinite(r.metric) and r.metric < THRESHOLD


register(Scenario(
    name="precision_fp16_softmax_overflow", category="pathological",
    mechanism="softmax computed in fp16 without max-subtraction: exp(z) overflows to inf "
              "once a logit passes ln(65504) = 11.09, and the loss becomes NaN",
    expected=("nonfinite",),
    source="Micikevicius et al. 2018 (arXiv 1710.03740); research/mechanisms.md sections "
           "6.1, 6.3 and Z16",
    criterion=f"finite weights and held-out cross-entropy < {THRESHOLD} after 300 steps",
    build=build, passed=passed, repairable_online=True, fast=True,
    prescription="compute softmax / log-sum-exp in fp32 (autocast does this for "
                 "F.cross_entropy and F.softmax) and subtract the max (use log_softmax); "
                 "or switch to bf16",
))
