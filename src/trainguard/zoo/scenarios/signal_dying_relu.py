"""Z4 - dying ReLU (Lu, Shin, Su & Karniadakis 2019; research/mechanisms.md 2.5 and Z4).

``signal_dying_relu_born_dead``: the paper's example. A ReLU MLP of width 2 and depth 10
with He-normal weights and zero biases fits f(x) = |x| on 256 points of [-1, 1] with Adam lr
1e-3. About 91% of such initialisations are born dead (some layer outputs 0 for every input;
[C] 90.9%, paper >90%): the network is a constant function and every gradient above the dead
layer is exactly zero. The scenario draws, for each seed, the first born-dead
initialisation of the seeded generator (91% of draws are; this fixes the premise instead
of leaving it to a 9% coin), so the bare run fails on every seed.

Criterion: MSE < 0.02 on the 256 points after 500 steps (constant predictor: Var|x| = 0.083;
a width-2 depth-2 net represents |x| exactly). Not repairable online (no step changes a
constant function); the doctor should prescribe LeakyReLU, a wider net (width 10: 0.13% born
dead [C]) or randomized asymmetric init (RAI).
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import Scenario, Setup, register
from ._common_a import below, eval_mse, linears, minibatches, mlp, seed_all

THRESHOLD = 0.02


def _born_dead(model: nn.Sequential, x: torch.Tensor) -> bool:
    h = x
    with torch.no_grad():
        for m in model:
            h = m(h)
            if isinstance(m, nn.ReLU) and bool((h.amax(0) <= 0).all()):
                return True
    return False


def build(seed: int, width: int = 2, act=nn.ReLU) -> Setup:
    g = seed_all(seed)
    x = torch.linspace(-1, 1, 256).unsqueeze(1)
    y = x.abs()
    for _ in range(100):
        model = mlp([1] + [width] * 10 + [1], act)
        for lin in linears(model):
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu", generator=g)
            nn.init.zeros_(lin.bias)
        if width != 2 or act is not nn.ReLU or _born_dead(model, x):
            break
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Setup(model=model, optimizer=opt, batches=minibatches(x, y, 256, seed),
                 loss_fn=nn.functional.mse_loss, steps=500, evaluate=eval_mse(x, y))


register(Scenario(
    name="signal_dying_relu_born_dead", category="pathological",
    mechanism="dying ReLU: width-2 depth-10 He-init ReLU net born dead (a layer outputs 0 "
              "for every input, the net is constant)",
    expected=("dead_units", "vanishing_gradient"),
    source="Lu et al. 2019 (arXiv 1903.06733); research/mechanisms.md 2.5 and Z4",
    criterion=f"MSE on |x| < {THRESHOLD} after 500 steps (constant predictor 0.083)",
    build=build, passed=below(THRESHOLD), repairable_online=False,
    prescription="LeakyReLU/ELU, a wider net (width >= 10), or randomized asymmetric init",
    fast=True, reference=THRESHOLD))
