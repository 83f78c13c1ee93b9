"""Parameter dtypes (issue #12, item 7): float64 models (what scientific users and NumPy ports
train in) and mixed fp32/fp64 models are guarded; complex parameters and sparse gradients are
refused at construction with a clear message, not a raw torch error at the first step."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import trainguard as tg


def _fit(m, o, g, steps, dtype):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 4, dtype=torch.float32)
        y = x.sum(1, keepdim=True).to(dtype)
        o.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        assert g.step(loss)
    return float(loss.detach())


def test_float64_model_is_guarded_and_trains_as_bare():
    losses = []
    for guarded in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        o = torch.optim.Adam(m.parameters(), lr=1e-2)
        if guarded:
            g = tg.Guard(m, o, console=False, sample_every=10)
            losses.append(_fit(lambda x: m(x.double()), o, g, 120, torch.float64))
            assert not g.findings and not g.actions
            assert g.probe.norm_dtype == torch.float64
        else:
            torch.manual_seed(1)
            for _ in range(120):
                x = torch.randn(16, 4)
                o.zero_grad()
                loss = nn.functional.mse_loss(m(x.double()), x.sum(1, keepdim=True).double())
                loss.backward()
                o.step()
            losses.append(float(loss.detach()))
    assert losses[0] == losses[1]  # bit-identical to the bare run


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1).double()

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.b(torch.tanh(self.a(x)).double())


def test_float64_batchnorm_model_is_guarded():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).double()
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = tg.Guard(m, o, console=False)
    assert _fit(lambda x: m(x.double()), o, g, 30, torch.float64) < 10
    assert not [f for f in g.findings if f.severe]


def test_mixed_fp32_fp64_model_is_guarded():
    torch.manual_seed(0)
    m = _Mixed()
    o = torch.optim.SGD(m.parameters(), lr=1e-2)
    g = tg.Guard(m, o, console=False, sample_every=10)
    assert _fit(m, o, g, 60, torch.float64) < 10
    assert not [f for f in g.findings if f.severe]


def test_complex_parameters_are_refused_clearly():
    m = nn.Linear(4, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="real floating-point parameters"):
        tg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.1), console=False)


def test_sparse_gradients_are_refused_clearly():
    m = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="sparse gradients"):
        tg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.1), console=False)
    e = nn.Embedding(10, 4)
    with pytest.raises(TypeError, match="SparseAdam"):
        tg.Guard(e, torch.optim.SparseAdam(e.parameters(), lr=0.1), console=False)
