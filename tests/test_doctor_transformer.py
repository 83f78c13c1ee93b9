"""The doctor on real transformers and real optimizer setups (issue #9): no crash where the
fused attention kernel has no double backward (math kernel, else finite differences, said in
the report), optimizer state matched to parameters by identity (weight-decay groups), no
explosion or collapse finding on a healthy GPT-2-style init, and a suggested learning rate
never above the limit printed beside it nor taken from a sweep that never learned."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from trainguard.doctor import doctor
from trainguard.doctor.curvature import _hvp_fn, preconditioner, sharpness
from trainguard.zoo.scenarios._common_b import lm_loss
from trainguard.zoo.scenarios.lr_too_high import build_gpt

torch.set_num_threads(1)


def _gpt(gpt2_init: bool = False):
    s = build_gpt(0)
    m = s.model
    if gpt2_init:  # GPT-2: N(0, 0.02) everywhere, residual projections / sqrt(2 n_layers)
        for name, mod in m.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0, 0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            if name.endswith(("proj", "ff.2")):
                nn.init.normal_(mod.weight, 0, 0.02 / math.sqrt(4))
    return s, m, list(itertools.islice(s.batches(), 8))


def _decay_groups(m: nn.Module, lr: float = 3e-3) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers: matrices decay, vectors do not (another order than
    model.parameters())."""
    decay = [p for p in m.parameters() if p.dim() >= 2]
    nodecay = [p for p in m.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": nodecay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99))


def test_hvp_through_sdpa_attention_uses_the_math_kernel():
    _, m, data = _gpt()
    hvp, grads, loss, note = _hvp_fn(m, lm_loss, data[0], torch.device("cpu"))
    assert note == "" and grads and math.isfinite(loss)
    v = [torch.randn_like(p) for p in m.parameters()]
    assert all(torch.isfinite(h).all() for h in hvp(v))


class _TanhGrad(torch.autograd.Function):
    """The derivative of tanh as an op without a derivative of its own, as fused kernels
    often are (the CPU flash-attention backward)."""

    @staticmethod
    def forward(ctx, g, y):  # type: ignore[no-untyped-def]
        return g * (1 - y * y)

    @staticmethod
    def backward(ctx, gg):  # type: ignore[no-untyped-def]
        raise RuntimeError("derivative for _TanhGrad is not implemented")


class _NoDoubleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (y,) = ctx.saved_tensors
        return _TanhGrad.apply(g, y)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.b(_NoDoubleBackward.apply(self.a(x)))


def test_finite_difference_fallback_matches_the_exact_curvature():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    net = _Net()
    fd = sharpness(net, nn.MSELoss(), (x, y), torch.device("cpu"), None, 0.1)
    assert "finite-difference" in fd.note
    exact_net = nn.Sequential(net.a, nn.Tanh(), net.b)  # the same function, differentiable twice
    ex = sharpness(exact_net, nn.MSELoss(), (x, y), torch.device("cpu"), None, 0.1)
    assert ex.note == ""
    assert fd.lambda_max == pytest.approx(ex.lambda_max, rel=0.05)
    # the doctor runs on it and says so
    rep = doctor(net, nn.MSELoss(), [(x, y)], torch.optim.SGD(net.parameters(), lr=0.1),
                 lr_range=False, noise=False, precision=False)
    assert rep.curvature is not None and "finite-difference" in rep.curvature.note


def test_preconditioner_matches_state_by_identity_not_position():
    _, m, data = _gpt()
    opt = _decay_groups(m)
    for x, y in data[:3]:
        opt.zero_grad()
        lm_loss(m(x), y).backward()
        opt.step()
    params = [p for p in m.parameters() if p.requires_grad]
    P = preconditioner(opt, params)
    assert P is not None and len(P) == len(params)
    for p, pre in zip(params, P):
        assert pre.shape == p.shape  # by position, the groups' order would pair other shapes


def test_doctor_on_a_char_gpt_with_weight_decay_groups_does_not_crash_and_is_safe():
    _, m, data = _gpt()
    rep = doctor(m, lm_loss, data, _decay_groups(m), noise=False, precision=False,
                 range_steps=60)
    assert rep.curvature is not None and math.isfinite(rep.max_stable_lr)
    # consistent with the limit printed beside it, and far below the LRs that ruin it (0.1+)
    assert rep.suggested_lr <= rep.max_stable_lr
    assert rep.suggested_lr < 0.05


def test_healthy_gpt2_style_init_is_not_called_exploding_or_collapsing():
    _, m, data = _gpt(gpt2_init=True)
    rep = doctor(m, lm_loss, data, torch.optim.AdamW(m.parameters(), lr=3e-3),
                 lr_range=False, noise=False, precision=False)
    kinds = {f.kind for f in rep.findings}
    assert not kinds & {"activation_explosion", "activation_collapse", "grad_explosion",
                        "vanishing_gradient"}, [str(f) for f in rep.findings]
    assert all(lv.verdict == "healthy" for lv in rep.layers), [
        (lv.name, lv.verdict) for lv in rep.layers if lv.verdict != "healthy"]


def test_a_net_that_cannot_learn_gets_no_absurd_lr_from_the_range_test():
    """A dead first layer: the sweep's loss never improves, its "minimum" is noise; the old
    doctor suggested lr 1e-8 (issue #13)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        m[0].bias.fill_(-100.0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(64, 64, generator=g), torch.randint(0, 10, (64,), generator=g))
            for _ in range(8)]
    rep = doctor(m, nn.functional.cross_entropy, data, torch.optim.Adam(m.parameters(), lr=1e-3),
                 noise=False, precision=False)
    assert rep.range_test is not None and not rep.range_test.improved
    assert rep.suggested_lr >= 1e-4


def test_an_lr_past_the_curvature_limit_whose_trial_steps_improve_is_no_error():
    """Lightning's demo Transformer (SGD 0.1) has its sharpest direction in an attention input
    projection, whose loss is bounded (the step saturates the softmax): past 6x the curvature
    limit its trial steps still fall, and the doctor said "[error] the top direction diverges
    geometrically: set the learning rate to 0.000235" (at width 200: 213x; here, width 64:
    11x). Now info, and the advice keeps the LR with a warmup."""
    pytest.importorskip("lightning")
    from lightning.pytorch.demos.transformer import LightningTransformer, Transformer
    torch.manual_seed(0)
    m = LightningTransformer(vocab_size=64)
    m.model = Transformer(vocab_size=64, ninp=64, nhead=2, nhid=64, nlayers=1)
    seq = (torch.arange(16 * 17 * 8) % 61).reshape(8, 16, 17)
    data = [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seq]
    rep = doctor(m, None, data, torch.optim.SGD(m.parameters(), lr=0.1), precision=False,
                 noise=False, progress=False)
    lr = [f for f in rep.findings if f.kind == "lr_too_high"]
    assert lr and lr[0].severity == "info" and lr[0].evidence["lr"] / lr[0].evidence["max_stable_lr"] > 6
    assert rep.trial_losses[-1] < rep.trial_losses[0] and rep.healthy
    assert rep.prescriptions[0].action.startswith("keep the learning rate 0.1")
    assert rep.suggested_lr <= rep.max_stable_lr  # the contract: never above the limit printed
