"""Z17 - fp16 gradient underflow without loss scaling (Micikevicius et al. 2018).

Half precision flushes magnitudes below 2^-24 = 5.96e-8 to zero (subnormals below 6.1e-5
keep only a few bits). A regression whose targets are small numbers (here ~1e-3, e.g. a
rate in natural units, predicted by a head with a fixed 1e-3 output scale) has a loss ~1e-6
and activation gradients 2(y_hat - y)/B * 1e-3 of order 1e-8 and below, so
in an fp16 backward pass most of them round to zero and the hidden layers stop learning
(SSD: 67% of activation gradients were zero and the net diverged without scaling; section
6.2). The fp16 backward is emulated with tensor hooks that round every activation gradient
and every weight gradient through ``torch.float16``.

Setup: MLP 64-128-128-1 (ReLU) on digits pixels, regression on a fixed random teacher scaled
to RMS TARGET_SCALE, Adam lr 1e-3, batch 64, 400 steps.
Criterion: held-out relative MSE (MSE / Var(y)) < THRESHOLD; fp32 (or loss scale 2^16)
reaches it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, finite_run, minibatches, seed_all

TARGET_SCALE = 1e-3
THRESHOLD = 0.45


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


class Fp16BackwardMLP(nn.Module):
    """An MLP whose backward pass rounds activation gradients through fp16."""

    def __init__(self, sizes: list[int], emulate: bool = True, loss_scale: float = 1.0,
                 out_scale: float = 1.0) -> None:
        super().__init__()
        self.out_scale = out_scale
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.act = nn.ReLU()
        self.emulate, self.loss_scale = emulate, loss_scale
        if emulate:
            for p in self.parameters():
                p.register_hook(self._round_param_grad)

    def _round_param_grad(self, g: torch.Tensor) -> torch.Tensor:
        # weight gradients are produced in fp16 and unscaled in fp32 (GradScaler semantics)
        return fp16(g * self.loss_scale) / self.loss_scale

    def _round(self, h: torch.Tensor) -> torch.Tensor:
        if self.emulate and h.requires_grad:
            h.register_hook(lambda g: fp16(g * self.loss_scale) / self.loss_scale)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = self._round(layer(h))
            if i < len(self.layers) - 1:
                h = self.act(h)
        return self._round(h.squeeze(-1) * self.out_scale)


def build(seed: int, emulate: bool = True, loss_scale: float = 1.0) -> Setup:
    g = seed_all(seed)
    xtr, _, xte, _ = digits()
    teacher = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        t_tr, t_te = teacher(xtr).squeeze(-1), teacher(xte).squeeze(-1)
        mu, sd = t_tr.mean(), t_tr.std()
        ytr = (t_tr - mu) / sd * TARGET_SCALE
        yte = (t_te - mu) / sd * TARGET_SCALE
    torch.manual_seed(seed)
    model = Fp16BackwardMLP([64, 128, 128, 1], emulate=emulate, loss_scale=loss_scale,
                           out_scale=TARGET_SCALE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    var = float(yte.var())

    def evaluate(m: nn.Module) -> float:
        return float(((m(xte) - yte) ** 2).mean()) / var

    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 64, seed),
                 loss_fn=nn.functional.mse_loss, steps=400, evaluate=evaluate)


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="precision_fp16_grad_underflow", category="pathological",
    mechanism="fp16 backward without loss scaling: activation gradients below 2^-24 flush "
              "to zero, the hidden layers get no gradient and training stalls",
    expected=("vanishing_gradient", "plateau"),
    source="Micikevicius et al. 2018 (arXiv 1710.03740); research/mechanisms.md sections "
           "6.1-6.3 and Z17",
    criterion=f"held-out relative MSE < {THRESHOLD} after 400 steps",
    build=build, passed=passed, repairable_online=False,
    prescription="use loss scaling: torch.amp.GradScaler (dynamic, init_scale 2**16) or a "
                 "static scale that lifts the activation gradients above 2^-24; or bf16",
))
