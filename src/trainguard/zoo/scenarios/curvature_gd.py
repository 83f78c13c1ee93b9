"""Curvature and the learning rate under full-batch gradient descent (research/mechanisms.md
section 3 and Z7): one pathological run and two benign look-alikes the Guard must leave alone.

All three measure the top Hessian eigenvalue lambda at initialisation by power iteration on
Hessian-vector products (30 iterations) and set the learning rate as a multiple of 1/lambda:

* ``curvature_gd_past_limit`` (Z7, pathological): eta = 8/lambda, four times the stability
  limit 2/lambda of GD on a quadratic (Cohen et al. 2021). The loss grows by ~(1 - eta*lambda)^2
  = 49x per step along the top eigenvector until it overflows or saturates.
* ``curvature_edge_of_stability`` (healthy): eta = 1.5/lambda. Progressive sharpening drives
  lambda up to ~2/eta, where it hovers while the loss keeps falling non-monotonically (Cohen
  et al. 2021): benign, must stay silent.
* ``curvature_catapult`` (healthy): a wide two-layer ReLU net with MSE at eta = 3/lambda_0,
  between the lazy limit 2/lambda_0 and the divergence limit (~4/lambda_0 in the solvable model,
  ~12/lambda_0 empirically for ReLU nets; Lewkowycz et al. 2020). The loss first rises, the
  curvature drops, then the loss converges: benign, must stay silent.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import Scenario, Setup, register
from ._common_a import below, digits, eval_mse, minibatches, seed_all, top_hessian_eigenvalue

N_TRAIN = 512
STEPS = 300
#: pass: training MSE on one-hot digits (constant predictor 0.09) below this; the eta = 1/lambda
#: run reaches 0.012-0.014 in 300 steps, the EoS run 0.010-0.011 (seeds 0-1)
THRESHOLD = 0.03


def _digits_onehot() -> tuple[torch.Tensor, torch.Tensor]:
    xtr, ytr, _, _ = digits()
    x = xtr[:N_TRAIN]
    y = nn.functional.one_hot(ytr[:N_TRAIN], 10).float()
    return x, y


def tanh_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 10))


def lambda_max(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return top_hessian_eigenvalue(model, lambda: nn.functional.mse_loss(model(x), y))


def build_gd(seed: int, eta_lambda: float) -> Setup:
    seed_all(seed)
    x, y = _digits_onehot()
    model = tanh_mlp()
    lam = lambda_max(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=eta_lambda / lam)
    return Setup(model=model, optimizer=opt, batches=minibatches(x, y, N_TRAIN, seed),
                 loss_fn=nn.functional.mse_loss, steps=STEPS, evaluate=eval_mse(x, y))


register(Scenario(
    name="curvature_gd_past_limit", category="pathological",
    mechanism="full-batch GD at eta = 8/lambda_max, four times past the curvature limit 2/lambda",
    expected=("divergence", "nonfinite", "grad_explosion", "loss_spike"),
    source="Cohen et al. 2021 (arXiv 2103.00065); research/mechanisms.md 3.1 and Z7",
    criterion=f"finite, training MSE < {THRESHOLD} after {STEPS} steps",
    build=lambda s: build_gd(s, 8.0), passed=below(THRESHOLD), repairable_online=True,
    fast=True, reference=THRESHOLD))

register(Scenario(
    name="curvature_edge_of_stability", category="healthy",
    mechanism="full-batch GD at eta = 1.5/lambda_max(init): progressive sharpening to 2/eta, "
              "then non-monotone but converging (edge of stability)",
    expected=(), source="Cohen et al. 2021 (arXiv 2103.00065); research/mechanisms.md 3.2",
    criterion=f"finite, training MSE < {THRESHOLD} after {STEPS} steps",
    build=lambda s: build_gd(s, 1.5), passed=below(THRESHOLD), fast=True, reference=THRESHOLD))


# ----------------------------------------------------------------------------- catapult
CAT_WIDTH = 2048
CAT_STEPS = 300
CAT_THRESHOLD = 0.01


def build_catapult(seed: int, eta_lambda: float = 3.0) -> Setup:
    """Two-layer ReLU net in NTK parameterisation (f = v . relu(W x / sqrt(d)) / sqrt(n)),
    width 2048, on 256 digits with one-hot MSE targets; lambda_0 measured at init."""
    g = seed_all(seed)
    xtr, ytr, _, _ = digits()
    x = xtr[:256]
    y = nn.functional.one_hot(ytr[:256], 10).float()

    class NTKNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(CAT_WIDTH, 64, generator=g))
            self.act = nn.ReLU()
            self.v = nn.Parameter(torch.randn(10, CAT_WIDTH, generator=g))

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            h = self.act(inp @ self.w.T / math.sqrt(64))
            return h @ self.v.T / math.sqrt(CAT_WIDTH)

    model = NTKNet()
    lam = lambda_max(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=eta_lambda / lam)
    return Setup(model=model, optimizer=opt, batches=minibatches(x, y, 256, seed),
                 loss_fn=nn.functional.mse_loss, steps=CAT_STEPS, evaluate=eval_mse(x, y))


register(Scenario(
    name="curvature_catapult", category="healthy",
    mechanism="wide two-layer ReLU net (NTK parameterisation), MSE, eta = 3/lambda_0: the loss "
              "rises then converges as the curvature drops (catapult phase)",
    expected=(), source="Lewkowycz et al. 2020 (arXiv 2003.02218); research/mechanisms.md 3.5",
    criterion=f"finite, training MSE < {CAT_THRESHOLD} after {CAT_STEPS} steps",
    build=build_catapult, passed=below(CAT_THRESHOLD), reference=CAT_THRESHOLD))
