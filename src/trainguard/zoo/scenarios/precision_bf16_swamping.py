"""Z18 - bf16 weight-update swamping (Zamirai et al. 2020; Micikevicius et al. 2018).

bf16 keeps 8 significant bits: w + dw rounds back to w whenever |dw| < |w| * 2^-9 (half an
ulp; research/mechanisms.md sections 6.1 and 6.4: 1.0 + 1e-3 -> 1.0). Parameters stored in
bf16 with no fp32 master copy therefore ignore Adam's steps (~lr per coordinate) on every
coordinate of magnitude above ~lr * 2^8. A unit-scaled network (weights N(0, 1), the
1/sqrt(fan_in) applied in the forward pass, as in unit scaling, Blake et al. 2023) holds
O(1) weights, so nearly all of its updates are lost and the loss stalls.

Setup: fine-tuning. A unit-scaled MLP 64-128-1 (tanh) starts from a teacher's weights plus
N(0, 0.1^2) noise and regresses the teacher on digits pixels; parameters in bf16 (forward in
fp32 from the bf16 values), Adam lr 2e-4, batch 32, 800 steps. At lr 2e-4 every weight with
|w| > ~2e-4 * 2^8 = 0.05 (96% of N(0, 1)) ignores its update in bf16.
Calibration (seeds 0-4): fp32 parameters reach 0.012-0.074, bf16 parameters 1.0-9.0.
Criterion: held-out relative MSE (MSE / Var(y)) < THRESHOLD; the same run with fp32
parameters reaches it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, finite_run, minibatches, seed_all

THRESHOLD = 0.2
INIT_NOISE = 0.1
LR = 2e-4


class UnitScaledLinear(nn.Module):
    """Linear layer with N(0, 1) weights; the 1/sqrt(fan_in) is applied in the forward pass."""

    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in).to(dtype))
        self.bias = nn.Parameter(torch.zeros(n_out).to(dtype))
        self.scale = 1.0 / math.sqrt(n_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.float() * self.scale, self.bias.float())


def _net(dtype: torch.dtype) -> nn.Sequential:
    return nn.Sequential(UnitScaledLinear(64, 128, dtype), nn.Tanh(), UnitScaledLinear(128, 1, dtype))


def build(seed: int, dtype: torch.dtype = torch.bfloat16, lr: float = LR) -> Setup:
    g = seed_all(seed)
    xtr, _, xte, _ = digits()
    xtr, xte = (xtr - 0.3) * 2, (xte - 0.3) * 2
    teacher = _net(torch.float32)
    with torch.no_grad():
        ytr, yte = teacher(xtr).squeeze(-1), teacher(xte).squeeze(-1)
    # the "pretrained" student: the teacher's weights plus a small perturbation to fine-tune away
    model = _net(dtype)
    with torch.no_grad():
        for p, q in zip(model.parameters(), teacher.parameters()):
            p.copy_((q + INIT_NOISE * torch.randn(q.shape, generator=g)).to(dtype))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    var = float(yte.var())

    def evaluate(m: nn.Module) -> float:
        return float(((m(xte).squeeze(-1) - yte) ** 2).mean()) / var

    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 32, seed),
                 loss_fn=lambda out, y: nn.functional.mse_loss(out.squeeze(-1), y),
                 steps=800, evaluate=evaluate)


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="precision_bf16_swamping", category="pathological",
    mechanism="parameters kept in bf16 without fp32 master weights: Adam updates (~lr) are "
              "below half an ulp of the O(1) weights and round away, so training stalls",
    expected=("plateau",),
    source="Zamirai et al. 2020 (arXiv 2010.06192); Micikevicius et al. 2018 (arXiv "
           "1710.03740); research/mechanisms.md sections 6.1, 6.4 and Z18",
    criterion=f"held-out relative MSE < {THRESHOLD} after 800 steps (fp32 parameters pass)",
    build=build, passed=passed, repairable_online=False,
    prescription="keep fp32 master weights (autocast instead of model.to(bfloat16)), or use "
                 "Kahan-compensated / stochastically rounded updates",
))
