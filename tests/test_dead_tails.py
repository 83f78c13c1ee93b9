"""Dead units of smooth ReLU-likes (ELU, SELU, CELU, SiLU, GELU, Mish): a unit whose
pre-activation sits in the activation's flat negative tail on every row, where its slope is
under 1% of the linear part's (``stats.DEAD_TAILS``), is dead as a ReLU unit at 0 is. A DDPM
denoiser (SiLU MLP) at 30x its working Adam LR killed its last SiLU layer and sat at loss 1.0,
predicting zero noise, with no finding but a late plateau (``bench/diffusion_trial.py``)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainguard as tg
from trainguard import stats
from trainguard.detect import DeadUnitsDetector
from trainguard.types import StepStats

torch.set_num_threads(1)

ACTIVATIONS = [
    ("elu", nn.ELU(), 1.0), ("elu", nn.ELU(alpha=2.0), 1.0), ("selu", nn.SELU(), 1.0507009873554805),
    ("celu", nn.CELU(alpha=0.5), 1.0),
    ("silu", nn.SiLU(), 1.0), ("gelu", nn.GELU(), 1.0), ("gelu", nn.GELU(approximate="tanh"), 1.0),
    ("mish", nn.Mish(), 1.0),
]


@pytest.mark.parametrize("kind,act,slope", ACTIVATIONS, ids=lambda v: repr(v) if isinstance(v, nn.Module) else None)
def test_a_unit_is_dead_exactly_where_its_slope_is_under_one_percent_on_every_row(kind, act, slope):
    """Units whose pre-activations are centred from -12 to +3 (64 rows each): the interval
    test on the outputs agrees with autograd's slope on every unit not within a whisker of
    the 1% boundary. (A SiLU/GELU/Mish unit held within 0.024 of x = 0 on every row would read
    dead too: not drawn here, see ``DEAD_TAILS``.)"""
    assert stats.activation_kind(act) == kind
    g = torch.Generator().manual_seed(0)
    centres = torch.linspace(-12, 3, 301, dtype=torch.float64)
    x = (centres[None, :] + 0.3 * torch.randn(64, 301, generator=g, dtype=torch.float64))
    x = x.requires_grad_()
    out = act(x)
    grad, = torch.autograd.grad(out.sum(), x)
    ratio = grad.abs() / slope
    truth = (ratio < stats.DEAD_SLOPE).all(dim=0)
    clear = (ratio < 0.009).all(dim=0) | (ratio > 0.011).any(dim=0)
    got = stats.dead_units(out.detach().float(), 1, stats.dead_interval(kind, getattr(act, "alpha", None)))
    assert truth.any() and (~truth).any()
    assert torch.equal(got[clear], truth[clear])


def test_leaky_relu_and_softplus_are_never_dead():
    """Leaky ReLU and PReLU keep their negative slope; softplus is mostly a positivity
    transform on an output (a predicted standard deviation), in its tail when confident."""
    assert stats.dead_interval("leaky_relu") is None
    assert stats.dead_interval("prelu") is None
    assert stats.dead_interval("softplus") is None


class Tail(nn.Module):
    """Four activations, two as modules and two as functions with non-default parameters;
    units 0-3 of each pushed deep into the negative tail (softplus never counts as dead)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.silu, self.elu = nn.SiLU(), nn.ELU(alpha=2.0)
        with torch.no_grad():
            self.fc.bias[:4] = -40.0

    def forward(self, x):
        h = self.fc(x)
        return self.silu(h) + self.elu(h) + F.elu(h, 3.0) + F.softplus(h, beta=2.0)  # never dead


def test_the_sampled_probe_counts_dead_tails_of_modules_and_functions():
    torch.manual_seed(0)
    model = Tail()
    sampler = stats.ActivationSampler(model)
    sampler.arm()
    model(torch.randn(64, 8)).sum().backward()
    sampled = sampler.collect()
    read = sampled.unpack(sampled.values.double().numpy())
    dead = {name: four[0] for name, (_kind, four) in read.items() if not math.isnan(four[0])}
    assert dead == {"silu": 4 / 16, "elu": 4 / 16, "fc.elu": 4 / 16}, read


def _stats(step: int, frac: float) -> StepStats:
    s = StepStats(step=step, loss=1.0, grad_norm=1.0)
    s.activations = {"net.5": {"kind": "silu", "dead_fraction": frac, "saturated_fraction": None,
                               "second_moment": 0.1, "units": 256, "rows": 128}}
    return s


def test_a_smooth_layer_killed_in_training_is_named_with_its_activation():
    det = DeadUnitsDetector()
    assert det.update(_stats(0, 0.0)) == []
    assert det.update(_stats(50, 0.3)) == []
    assert det.update(_stats(100, 0.8)) == []  # not reported, nor healthy
    f, = det.update(_stats(150, 0.92))
    assert f.kind == "dead_units" and f.where == "net.5"
    assert f.evidence["cause"] == "killed" and f.evidence["healthy_step"] == 50
    assert f.evidence["activation"] == "silu"
    assert "flat negative tail" in f.message and "silu" in f.message
    assert any("normalisation" in r for r in f.remedies)


def test_a_smooth_layer_partly_in_its_tail_is_not_dead():
    """Swiss-roll DDPMs at Adam 1e-2: a last SiLU layer 35% -> 71% -> 61% -> 32% -> 10% in
    the tail over 250 steps, another 48% -> 87% -> 84% -> 81% -> 72%..., the loss unharmed (Adam
    rescales the tail's small gradient); the ReLU rise rule (>= 0.4 up to >= 0.6) rolled them
    back. A smooth layer's bar is 90%."""
    det = DeadUnitsDetector()
    for step, frac in ((0, 0.0), (2700, 0.352), (2750, 0.711), (2800, 0.609), (2850, 0.324),
                       (2950, 0.102), (3000, 0.48), (3050, 0.867), (3100, 0.84), (3150, 0.812)):
        assert det.update(_stats(step, frac)) == []


class Denoiser(nn.Module):
    """A DDPM noise predictor: MLP of the noisy digit and a sinusoidal embedding of t (SiLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64 + 64, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(),
                                 nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 64))

    def forward(self, x, t):
        freqs = torch.exp(-math.log(10000.0) * torch.arange(32) / 32)
        a = t.float()[:, None] * freqs[None]
        return self.net(torch.cat([x, a.sin(), a.cos()], 1))


def ddpm_batches(seed: int = 1):
    """Batches of 128 noisy digits, their timesteps and the noise to predict (linear betas
    1e-4..0.02 over T = 1000), drawn from one generator."""
    from sklearn.datasets import load_digits
    X = torch.tensor(load_digits().data / 8.0 - 1.0, dtype=torch.float32)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    g = torch.Generator().manual_seed(seed)
    while True:
        x0 = X[torch.randint(0, len(X), (128,), generator=g)]
        t = torch.randint(0, 1000, (128,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t][:, None]
        yield a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def _ddpm(guarded: bool, steps: int = 300) -> tuple[list[float], tg.Guard | None]:
    torch.manual_seed(1)
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)  # 30x the working 1e-3
    guard = tg.Guard(model, opt, console=False) if guarded else None
    losses = []
    for _, (xt, t, eps) in zip(range(steps), ddpm_batches()):
        loss = F.mse_loss(model(xt, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(float(loss.detach()))
        guard.step(loss) if guard is not None else opt.step()
    return losses, guard


def test_a_diffusion_model_whose_silu_layer_dies_is_rolled_back_with_a_lower_lr():
    bare, _ = _ddpm(False)
    seen, guard = _ddpm(True)
    assert guard is not None
    assert sum(bare[-100:]) / 100 > 0.95  # predicting zero noise: MSE = Var(eps) = 1
    f = next(f for f in guard.findings if f.kind == "dead_units")
    assert f.evidence["activation"] == "silu" and f.evidence["cause"] == "killed"
    kinds = {(a.kind, a.step) for a in guard.actions}
    assert ("rollback", f.step) in kinds and ("lr_backoff", f.step) in kinds
    assert sum(seen[-100:]) / 100 < 0.6


def test_the_doctor_prescribes_a_lower_lr_for_a_dead_smooth_layer_not_an_activation_swap():
    from trainguard.doctor.prescribe import prescribe
    from trainguard.types import Finding
    model = Denoiser()
    f = Finding("dead_units", 0, "1 silu layer(s) dead on the whole probe batch", where="net.5",
                locations=("net.5",), severity="error",
                evidence={"dead_fraction": {"net.5": 0.95}, "activations": ["silu"],
                          "widths": [256], "fully_dead": []})
    got = prescribe([f], model, {"lr": 0.03, "suggested_lr": 0.001})
    actions = [p.action for p in got]
    assert actions[0].startswith("lower the learning rate (now 0.03)"), actions
    assert got[0].remedy == "lr:0.001"
    assert any("LayerNorm" in a for a in actions)
    assert not any("ReLU" in a or "ELU" in a for a in actions), actions
    relu = Finding("dead_units", 0, "1 ReLU layer(s) dead", where="net.1", locations=("net.1",),
                   severity="error", evidence={"dead_fraction": {"net.1": 1.0},
                                               "activations": ["relu"], "widths": [8],
                                               "fully_dead": ["net.1"]})
    relu_model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert any("LeakyReLU" in p.action for p in prescribe([relu], relu_model, {"lr": 0.1}))


def test_the_doctor_names_a_silu_layer_born_in_its_tail():
    """A SiLU MLP whose first layer's biases start at -40: the doctor's propagation pass calls
    the layer dead with the Guard's definition, and prescribes no ReLU swap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 3))
    with torch.no_grad():
        model[0].bias.fill_(-40.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 16, generator=g), torch.randint(0, 3, (32,), generator=g))
               for _ in range(4)]
    rep = tg.doctor(model, F.cross_entropy, batches, torch.optim.Adam(model.parameters(), 1e-3),
                    steps=2, lr_range=False, precision=False, noise=False, progress=False)
    f = next(f for f in rep.findings if f.kind == "dead_units")
    assert f.evidence["activations"] == ["silu"] and "silu layer(s) dead" in f.message
    assert f.evidence["dead_fraction"]["1"] == 1.0
    remedies = [p.remedy for p in rep.prescriptions]  # init:he may come under another finding
    assert "init:he" in remedies and "norm:layernorm" in remedies, remedies
    assert not any("ReLU" in p.action for p in rep.prescriptions), [p.action for p in rep.prescriptions]
