"""Z5 - exploding gradients in a vanilla tanh RNN (Pascanu, Mikolov & Bengio 2013).

Setup: tanh RNN with 50 hidden units on the adding problem (T = 50, batch 20, Pascanu's
minibatch), recurrent weights W_rec = rho * Q with Q orthogonal and rho = 1.5: the largest
singular value exceeds 1/gamma = 1 (tanh), the necessary condition for exploding gradients
(research/mechanisms.md 2.4; the backpropagated Jacobian grows like ~18 over T = 100 at
rho = 1.5 [C]). Plain SGD lr 0.08, no momentum, 400 steps.

Expected: the gradient norm hits cliffs tens of times its median; the bare run overflows to
inf/NaN. Repair: global-norm clipping (Pascanu: threshold 1.0 or near the running average
norm) - an online remedy, so the guarded run should stay finite.

Criterion: finite and held-out MSE < 0.25. The constant predictor scores Var(sum of two
U(0,1)) = 0.167; in 400 steps no configuration learns the long-range sum at T = 50 (a
vanilla RNN needs far more updates), so the criterion asks only that training stays sane:
no worse than 1.5x the constant predictor. Calibration (seeds 0-4): bare inf on all five;
clip at 1.0: 0.17-0.23.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import Scenario, Setup, register
from ._common_a import below, eval_mse, seed_all
from .healthy_models import adding_batch

T = 50
RHO = 1.5
THRESHOLD = 0.25
LR = 0.08


class VanillaRNN(nn.Module):
    def __init__(self, rho: float, hidden: int = 50, g: torch.Generator | None = None) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 1)
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(rho * q)
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def build(seed: int, rho: float = RHO) -> Setup:
    g = seed_all(seed)
    model = VanillaRNN(rho, g=g)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xte, yte = adding_batch(torch.Generator().manual_seed(10_000 + seed), 1000, T)

    def batches():
        while True:
            yield adding_batch(g, 20, T)
    return Setup(model=model, optimizer=opt, batches=batches, loss_fn=nn.functional.mse_loss,
                 steps=400, evaluate=eval_mse(xte, yte))


register(Scenario(
    name="recurrent_exploding_rnn", category="pathological",
    mechanism=f"exploding gradients through time: tanh RNN, W_rec = {RHO} x orthogonal "
              f"(sigma_max > 1/gamma), adding problem T = {T}, SGD lr {LR}",
    expected=("grad_explosion", "nonfinite", "loss_spike"),
    source="Pascanu, Mikolov & Bengio 2013 (arXiv 1211.5063); research/mechanisms.md 2.4 and Z5",
    criterion=f"finite, held-out MSE < {THRESHOLD} after 400 steps (constant predictor 0.167)",
    build=build, passed=below(THRESHOLD), repairable_online=True, fast=True,
    reference=THRESHOLD))
