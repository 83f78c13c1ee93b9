"""The sampled activation statistics (dead and saturated fractions, second moment) equal a
direct computation on every read path: small activations read together after the forward pass
(``stats.BATCH_NUMEL``), large ones and ReLU families read in their hook, functional calls,
16-bit outputs; an activation written in place after its hook is reported as unknown, not with wrong
values (issue #15: the batched read)."""
import math

import pytest
import torch
from torch import nn

from trainguard import stats
from trainguard.measure import StepProbe


class Net(nn.Module):
    def __init__(self, width: int, functional: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, width), nn.Linear(width, width), nn.Linear(width, width)
        self.fc4 = nn.Linear(width, 4)
        self.tanh, self.sig, self.relu, self.gelu = nn.Tanh(), nn.Sigmoid(), nn.ReLU(), nn.GELU()
        self.functional = functional
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x):
        a = torch.tanh(self.fc1(x) * 3) if self.functional else self.tanh(self.fc1(x) * 3)
        b = self.sig(self.fc2(a) * 10)
        c = self.relu(self.fc3(b) - 0.5)
        d = self.gelu(c)
        self.seen = {"tanh": a.detach().clone(), "sig": b.detach().clone(),
                     "relu": c.detach().clone(), "gelu": d.detach().clone()}
        return self.fc4(d)


def _read(model: Net, x: torch.Tensor) -> dict[str, dict]:
    sampler = stats.ActivationSampler(model)
    sampler.arm()
    model(x).sum().backward()
    sampled = sampler.collect()
    vals = sampled.values.double().numpy() if sampled.values is not None else []
    return {name: StepProbe.activation_record(kind, *four)
            for name, (kind, four) in sampled.unpack(vals).items()}


def _expect(t: torch.Tensor) -> tuple[float, float, float, float]:
    t = t.double()
    dead = float((t.amax(dim=0) <= 0).double().mean())
    tanh_sat = float((t.abs() > 0.99).double().mean())
    sig_sat = float(((t < 0.01) | (t > 0.99)).double().mean())
    return dead, tanh_sat, sig_sat, float(t.square().mean())


@pytest.mark.parametrize("width", [16, 512])  # 64x16: batched; 64x512 > BATCH_NUMEL... per hook
def test_statistics_match_a_direct_computation(width):
    torch.manual_seed(0)
    model = Net(width)
    x = torch.randn(256 if width == 512 else 64, 8)
    if width == 512:
        assert x.shape[0] * width > stats.BATCH_NUMEL  # the in-hook path
    got = _read(model, x)
    assert set(got) == {"tanh", "sig", "relu", "gelu", "(output)"}
    d, ts, _ss, q = _expect(model.seen["tanh"])
    assert got["tanh"]["saturated_fraction"] == pytest.approx(ts, abs=1e-6) and ts > 0.05
    assert got["tanh"]["second_moment"] == pytest.approx(q, rel=1e-5)
    assert got["tanh"]["dead_fraction"] is None and got["tanh"]["units"] == width
    _d, _ts, ss, q = _expect(model.seen["sig"])
    assert got["sig"]["saturated_fraction"] == pytest.approx(ss, abs=1e-6) and ss > 0.01
    assert got["sig"]["second_moment"] == pytest.approx(q, rel=1e-5)
    d, _ts, _ss, q = _expect(model.seen["relu"])
    assert got["relu"]["dead_fraction"] == pytest.approx(d, abs=1e-6)
    assert got["relu"]["saturated_fraction"] is None
    assert got["relu"]["second_moment"] == pytest.approx(q, rel=1e-5)
    _d, _ts, _ss, q = _expect(model.seen["gelu"])
    assert got["gelu"]["second_moment"] == pytest.approx(q, rel=1e-5)
    # GELU's dead units: every output in its flat tail [-0.00331, 0] (here: a ReLU unit dead
    # before it gives GELU(0) = 0 on every row)
    g = model.seen["gelu"].double()
    gd = float(((g >= -0.00331) & (g <= 0)).all(dim=0).double().mean())
    assert got["gelu"]["dead_fraction"] == pytest.approx(gd, abs=1e-6) and gd == pytest.approx(d)
    assert got["gelu"]["saturated_fraction"] is None


def test_float64_outputs():
    """A float64 model's activations are read in fp64 (the batched count once asked for an
    fp32 norm of fp64 values: a RuntimeError on every sampled step of a float64 model)."""
    torch.manual_seed(0)
    model = Net(16).double()
    got = _read(model, torch.randn(64, 8, dtype=torch.float64))
    _d, ts, _ss, q = _expect(model.seen["tanh"])
    assert got["tanh"]["saturated_fraction"] == pytest.approx(ts, abs=1e-12)
    assert got["tanh"]["second_moment"] == pytest.approx(q, rel=1e-12)


def test_functional_and_bf16_outputs():
    torch.manual_seed(0)
    model = Net(16, functional=True).to(torch.bfloat16)
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    got = _read(model, x)
    # torch.tanh applied to fc1's output times 3 (a tensor no module produced): named after
    # the module whose forward called it
    assert "(root).tanh" in got
    _d, ts, _ss, q = _expect(model.seen["tanh"])
    assert got["(root).tanh"]["saturated_fraction"] == pytest.approx(ts, abs=1e-6)
    assert got["(root).tanh"]["second_moment"] == pytest.approx(q, rel=1e-2)  # bf16 values
    _d, _ts, ss, _q = _expect(model.seen["sig"])
    assert got["sig"]["saturated_fraction"] == pytest.approx(ss, abs=0.02)  # bf16 boundary


def test_an_activation_written_in_place_after_its_hook_is_not_reported_wrong():
    torch.manual_seed(0)
    model = Net(16)
    sampler = stats.ActivationSampler(model)
    sampler.arm()
    model(torch.randn(64, 8))
    # the tanh output written after its hook ran (legal when no backward follows, as in an
    # evaluation pass with grad on): read afterwards, its values would be the activation + 1
    held = [t for key, _k, t, _v, _p in sampler._pending if key == "tanh"]
    held[0].add_(1.0)
    sampled = sampler.collect()
    got = {name: StepProbe.activation_record(kind, *four) for name, (kind, four)
           in sampled.unpack(sampled.values.double().numpy()).items()}
    assert got["tanh"]["units"] == 0 and math.isnan(got["tanh"]["second_moment"])  # unknown
    _d, _ts, ss, _q = _expect(model.seen["sig"])
    assert got["sig"]["saturated_fraction"] == pytest.approx(ss, abs=1e-6)


def test_held_bytes_are_capped(monkeypatch):
    monkeypatch.setattr(stats, "BATCH_BYTES", 64 * 16 * 4)  # room for one 64x16 fp32 output
    torch.manual_seed(0)
    model = Net(16)
    got = _read(model, torch.randn(64, 8))
    _d, ts, _ss, q = _expect(model.seen["tanh"])
    assert got["tanh"]["saturated_fraction"] == pytest.approx(ts, abs=1e-6)
    _d, _ts, _ss, q = _expect(model.seen["gelu"])  # read in its hook: over the cap
    assert got["gelu"]["second_moment"] == pytest.approx(q, rel=1e-5)


class Switch(nn.Module):
    """Module activations only, until ``functional`` is set: then a torch.relu in forward."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)
        self.functional = False

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(torch.relu(h) if self.functional else h)


def _global_hooks() -> int:
    from torch.nn.modules import module
    return len(module._global_forward_hooks) + len(module._global_forward_pre_hooks)


def test_functional_calls_are_looked_for_on_every_tenth_pass_when_none_was_found():
    torch.manual_seed(0)
    model, x = Switch(), torch.randn(32, 8)
    sampler = stats.ActivationSampler(model)
    base = _global_hooks()
    looked = []
    for n in range(12):
        if n == 3:
            model.functional = True  # appears mid-run: seen at the next look (pass 10)
        sampler.arm()
        looked.append(_global_hooks() > base)
        model(x)
        got = sampler.collect()
        assert "act" in got.kinds  # module activations are read on every pass
        assert ("act.relu" in got.kinds) == (looked[-1] and model.functional)
    assert looked == [True] + [False] * 9 + [True, True]  # then looked at on every pass
    assert _global_hooks() == base
