"""Signal propagation at initialisation (research/mechanisms.md section 2, zoo Z1-Z3, Z6).

Deep plain nets whose initialisation shrinks or grows the signal geometrically with depth.
None of these can be repaired by a running guard (skip, clip, LR backoff and rollback do not
change the init or the architecture): the Guard's job is to name the mechanism early and
hand the run to the doctor, whose prescription each scenario states. All run on digits
(64 inputs, 10 classes) with SGD momentum 0.9, batch 64.

Criterion for Z1-Z3: held-out cross-entropy below 1.0 after the budget (chance ln 10 = 2.30;
the repaired configs of each docstring reach 0.1-0.3).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_a import below, digits, eval_ce, eval_mse, linears, minibatches, mlp, seed_all

THRESHOLD = 1.0


def _digits_setup(model: nn.Module, seed: int, *, lr: float, steps: int, momentum: float = 0.9
                  ) -> Setup:
    xtr, ytr, xte, yte = digits()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 64, seed),
                 loss_fn=nn.functional.cross_entropy, steps=steps, evaluate=eval_ce(xte, yte))


# ----------------------------------------------------------------------------- Z1
def build_sigmoid(seed: int, init: str = "standard") -> Setup:
    """Z1: 10 hidden layers x 256 sigmoid units, the pre-2010 init U[-1/sqrt(n), 1/sqrt(n)]
    (Glorot & Bengio 2010). Repair (``init="xavier"`` with tanh) is documented in the test."""
    seed_all(seed)
    act = nn.Sigmoid if init == "standard" else nn.Tanh
    model = mlp([64] + [256] * 10 + [10], act)
    for lin in linears(model):
        if init == "standard":
            b = 1 / math.sqrt(lin.in_features)
            nn.init.uniform_(lin.weight, -b, b)
        else:
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)
    return _digits_setup(model, seed, lr=0.1, steps=300)


register(Scenario(
    name="signal_sigmoid_vanishing", category="pathological",
    mechanism="vanishing gradients: 10-layer sigmoid MLP with the pre-2010 U[+-1/sqrt(n)] init; "
              "the first layers' gradients are ~1e-9 of the last one's",
    expected=("vanishing_gradient", "saturation", "plateau"),
    source="Glorot & Bengio 2010; research/mechanisms.md 2.1 and Z1",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 300 steps",
    build=build_sigmoid, passed=below(THRESHOLD), repairable_online=False,
    prescription="Xavier init with tanh (or He init with ReLU), batch norm, or a shallower net",
    fast=True, reference=THRESHOLD))


# ----------------------------------------------------------------------------- Z2
def build_relu_xavier(seed: int, init: str = "xavier") -> Setup:
    """Z2: 30 ReLU layers x 128 with Xavier (Glorot) init: the second moment halves per layer,
    ~1e-9 at the top (He et al. 2015). Repair: ``init="he"``."""
    seed_all(seed)
    model = mlp([64] + [128] * 30 + [10], nn.ReLU)
    for lin in linears(model):
        if init == "xavier":
            nn.init.xavier_normal_(lin.weight)
        else:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
    return _digits_setup(model, seed, lr=0.01, steps=300)


register(Scenario(
    name="signal_relu_xavier_deep", category="pathological",
    mechanism="forward signal collapse: 30-layer ReLU MLP with Xavier init halves the "
              "activation second moment per layer",
    expected=("vanishing_gradient", "plateau"),
    source="He et al. 2015 (arXiv 1502.01852); research/mechanisms.md 2.2 and Z2",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 300 steps",
    build=build_relu_xavier, passed=below(THRESHOLD), repairable_online=False,
    prescription="He (Kaiming) init for ReLU layers, or LSUV",
    reference=THRESHOLD))


# ----------------------------------------------------------------------------- Z3
def build_tanh_ordered(seed: int, sigma_w2: float = 0.5) -> Setup:
    """Z3: 50 tanh layers x 128, W ~ N(0, sigma_w^2/n), zero bias, sigma_w^2 = 0.5: the ordered
    phase (chi_1 < 1), signal and gradients shrink geometrically (Schoenholz et al. 2017).
    Repair: sigma_w^2 = 1 (critical), ideally orthogonal weights."""
    seed_all(seed)
    model = mlp([64] + [128] * 50 + [10], nn.Tanh)
    for lin in linears(model):
        nn.init.normal_(lin.weight, 0.0, math.sqrt(sigma_w2 / lin.in_features))
        nn.init.zeros_(lin.bias)
    return _digits_setup(model, seed, lr=0.01, steps=300)


register(Scenario(
    name="signal_tanh_ordered", category="pathological",
    mechanism="ordered phase: 50-layer tanh MLP at sigma_w^2 = 0.5 (chi_1 < 1), the signal "
              "decays with depth and the net is untrainable",
    expected=("vanishing_gradient", "plateau"),
    source="Schoenholz et al. 2017 (arXiv 1611.01232); Pennington et al. 2017; "
           "research/mechanisms.md 2.10 and Z3",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 300 steps",
    build=build_tanh_ordered, passed=below(THRESHOLD), repairable_online=False,
    prescription="critical init sigma_w^2 = 1 for tanh (orthogonal weights for dynamical "
                 "isometry), or LSUV",
    reference=THRESHOLD))


# ----------------------------------------------------------------------------- Z3, chaotic
def build_tanh_chaotic(seed: int, sigma_w2: float = 4.0, init: str = "gaussian") -> Setup:
    """Z3, chaotic half: the net of ``build_tanh_ordered`` (50 tanh layers x 128, zero bias,
    digits, SGD momentum 0.9 lr 0.01, batch 64, 300 steps) at sigma_w^2 = 4: chi_1 > 1, the
    chaotic phase (Poole 2016; Schoenholz 2017). At init 7% of the tanh outputs are
    saturated (|h| > 0.99; 12-13% in the first layer; mechanisms.md 2.10 [C]: 6.6%) and the
    backward signal grows with depth: ||grad W_1|| / ||grad W_51|| = 1.2e3-1.4e3 (critical
    orthogonal: 1.0). Training drives the first tanh layer to 92-94% saturated by step 100
    and the loss stays near chance.
    Repair: ``sigma_w2=1.0, init="orthogonal"`` (criticality with dynamical isometry,
    Pennington et al. 2017); ``init="orthogonal"`` scales an orthogonal matrix by sigma_w.
    Calibration (seeds 0-4, one thread, 1.6-3.2 s a run): bare 1.955 / 2.225 / 2.270 /
    2.093 / 2.190; repaired 0.303 / 0.233 / 0.155 / 0.203 / 0.278. Gaussian weights at
    sigma_w^2 = 1 (critical on average, no isometry at depth 50) still fail at this LR
    (2.15 / 2.08 / 2.02 / 1.44 / 1.96; they pass at lr 0.003, 0.24-0.35 on seeds 0-2); no
    LR trains the chaotic net (lr 0.003 and 0.001: 1.97-2.19 on seeds 0-2), nor do
    orthogonal weights at sigma_w^2 = 4 (2.08-2.14)."""
    if init not in ("gaussian", "orthogonal"):
        raise ValueError(f"init must be 'gaussian' or 'orthogonal', got {init!r}")
    seed_all(seed)
    model = mlp([64] + [128] * 50 + [10], nn.Tanh)
    for lin in linears(model):
        if init == "orthogonal":
            nn.init.orthogonal_(lin.weight, gain=math.sqrt(sigma_w2))
        else:
            nn.init.normal_(lin.weight, 0.0, math.sqrt(sigma_w2 / lin.in_features))
        nn.init.zeros_(lin.bias)
    return _digits_setup(model, seed, lr=0.01, steps=300)


register(Scenario(
    name="signal_tanh_chaotic", category="pathological",
    mechanism="chaotic phase: 50-layer tanh MLP at sigma_w^2 = 4 (chi_1 > 1), nearby inputs "
              "decorrelate with depth and the backward Jacobian grows geometrically; the net "
              "is untrainable at depth >> xi_c",
    expected=("saturation", "grad_explosion"),
    source="Poole et al. 2016 (arXiv 1606.05340); Schoenholz et al. 2017 (arXiv 1611.01232); "
           "Pennington et al. 2017 (arXiv 1711.04735); research/mechanisms.md 2.10 and Z3",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 300 steps",
    build=build_tanh_chaotic, passed=below(THRESHOLD), repairable_online=False,
    prescription="critical init sigma_w^2 = 1 for tanh with orthogonal weights (dynamical "
                 "isometry), or LSUV; no learning rate trains the chaotic net",
    reference=THRESHOLD))


# ----------------------------------------------------------------------------- Z6
class ResidualMLP(nn.Module):
    """x_{i+1} = x_i + W2 relu(W1 x_i), He init in every branch, no normalisation."""

    def __init__(self, blocks: int, width: int, zero_last: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.branches = nn.ModuleList()
        for _ in range(blocks):
            l1, act, l2 = nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
            for lin in (l1, l2):
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                nn.init.zeros_(lin.bias)
            if zero_last:
                nn.init.zeros_(l2.weight)
            self.branches.append(nn.Sequential(l1, act, l2))
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.branches:
            h = h + b(h)
        return self.out(h)


def build_residual(seed: int, zero_last: bool = False) -> Setup:
    """Z6: 50 residual blocks x 128, regression on a random 16-32-1 tanh teacher (MSE).
    Variance x3 per block: output std ~1e12 at init (mechanisms.md 2.9 [C]). Repair:
    ``zero_last=True`` (zero-init the last layer of each branch; Fixup/ReZero)."""
    g = seed_all(seed)
    x = torch.randn(1024, 16, generator=g)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        y = teacher(x)
        y = (y - y.mean()) / y.std()
    model = ResidualMLP(50, 128, zero_last=zero_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return Setup(model=model, optimizer=opt, batches=minibatches(x[:768], y[:768], 64, seed),
                 loss_fn=nn.functional.mse_loss, steps=200,
                 evaluate=eval_mse(x[768:], y[768:]))


def _residual_passed(r: RunResult) -> bool:
    """Finished, metric finite and below 0.5, and the last 100 losses finite: the first
    update overflows here, so a run that recovers (rolled back, then restructured) has seen
    non-finite losses in its first steps; what counts is that training ends sane."""
    tail = r.losses[-100:]
    return (r.finished and bool(tail) and all(math.isfinite(v) for v in tail)
            and math.isfinite(r.metric) and r.metric < 0.5)


register(Scenario(
    name="signal_residual_unnormalised", category="pathological",
    mechanism="50-block residual MLP without normalisation: the activation variance triples "
              "per block, the output is ~1e12 at init and the first update overflows",
    expected=("nonfinite", "grad_explosion", "divergence"),
    source="Zhang et al. 2019 (Fixup, arXiv 1901.09321); Bachlechner et al. 2020 (ReZero); "
           "research/mechanisms.md 2.9 and Z6",
    criterion="held-out MSE < 0.5 after 200 steps, the last 100 losses finite (constant "
              "predictor: 1.0)",
    build=build_residual, passed=_residual_passed, repairable_online=False,
    prescription="zero-init the last layer of each residual branch (Fixup) or a ReZero gate "
                 "alpha = 0, or add normalisation (pre-LN/BN)",
    fast=True, reference=0.5))
