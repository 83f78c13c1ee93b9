"""The healthy step's short path (issue #15): the same records and decisions as the general
path, in less Python. Each test pins one shortcut to the computation it replaces."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.detect import GradExplosionDetector, VanishingGradientDetector
from trainguard.stats import Probe, build_stats, grad_total, quick_stats
from trainguard.types import StepStats


def _net(seed: int = 0, norm: bool = False, deep: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if deep:  # more parameter tensors than the plain-Python grouping takes (QUICK_GROUPING)
        return nn.Sequential(nn.Linear(8, 16), *[nn.Sequential(nn.Linear(16, 16), nn.Tanh())
                                                 for _ in range(deep)], nn.Linear(16, 4))
    layers: list[nn.Module] = [nn.Linear(8, 16)]
    if norm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def _backward(m: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    return loss


@pytest.mark.parametrize("norm,deep", [(False, 0), (True, 0), (False, 40)])
def test_quick_record_equals_the_general_one(norm, deep):
    """Several tensors per module (weight and bias; BatchNorm's pair), and a model with more
    tensors than the plain-Python grouping takes: the per-module norms and the total are the
    same numbers as build_stats' numpy grouping, to the last bit."""
    from trainguard.stats import QUICK_GROUPING
    m = _net(norm=norm, deep=deep)
    assert (len(list(m.parameters())) > QUICK_GROUPING) == bool(deep)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = _backward(m)
    probe = Probe(m, opt)
    vec, idx, _ = probe.measure_device(loss, with_params=False)
    host = vec.tolist()
    quick = quick_stats(3, probe, host[:-1], idx, host[-1], lr=0.1)
    full = build_stats(3, probe, np.asarray(host[:-1]), idx, None, host[-1], lr=0.1)
    assert quick is not None
    assert quick.grad_norms == full.grad_norms
    assert quick.grad_norm == full.grad_norm == grad_total(host[:-1])
    assert quick.loss == full.loss and quick.modules == full.modules
    assert quick.param_norms is None and quick.lr == 0.1
    exact = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in m.parameters()))
    assert quick.grad_norm == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("norm,deep", [(False, 0), (True, 0), (False, 40)])
def test_cadence_record_equals_the_general_one(norm, deep):
    """On the parameter cadence the short path also groups the weights' norms: the same
    per-module norms and total as build_stats, to the last bit."""
    m = _net(norm=norm, deep=deep)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = _backward(m)
    probe = Probe(m, opt)
    vec, idx, _ = probe.measure_device(loss, with_params=True)
    host = vec.tolist()
    ng = len(idx)
    quick = quick_stats(3, probe, host[:ng], idx, host[-1], pn=host[ng:-1], lr=0.1)
    full = build_stats(3, probe, np.asarray(host[:ng]), idx, np.asarray(host[ng:-1]), host[-1],
                       lr=0.1)
    assert quick is not None and quick.param_norms is not None
    assert quick.param_norms == full.param_norms and quick.param_norm == full.param_norm
    assert quick.grad_norms == full.grad_norms and quick.grad_norm == full.grad_norm
    exact = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in m.parameters()))
    assert quick.param_norm == pytest.approx(exact, rel=1e-6)
    # a weight norm that is not finite is the general path's (it tells overflow from NaN)
    bad = host[ng:-1]
    bad[0] = math.inf
    assert quick_stats(3, probe, host[:ng], idx, host[-1], pn=bad) is None


@pytest.mark.parametrize("what", ["weight", "state"])
def test_cadence_step_hands_huge_values_to_the_general_path(what):
    """Finite but huge weights (> 1e15) or optimizer state on a parameter-cadence step are not
    taken by the short path: the general one names them at that step."""
    m = _net()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False)
    for t in range(12):
        opt.zero_grad()
        loss = _backward(m, seed=t)
        if t == 10:  # a cadence step (param_norm_every=10)
            with torch.no_grad():
                if what == "weight":
                    m[2].weight[0, 0] = 1e17
                else:
                    opt.state[m[2].weight]["exp_avg_sq"][0, 0] = 1e30
        g.step(loss)
    f = [f for f in g.core.findings if f.kind == "nonfinite"]
    assert f and f[0].step == 10, g.core.findings
    assert f[0].origin == ("parameters" if what == "weight" else "optimizer"), f[0]
    g.close()


def _freeze(m: nn.Module) -> int:
    """The first layer frozen whole and the last layer's bias alone (a module with one of its
    two tensors frozen); all of them left in the optimizer. Returns how many."""
    frozen = [*m[0].parameters(), m[-1].bias]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


@pytest.mark.parametrize("deep", [0, 40])
def test_quick_record_with_frozen_parameters_equals_the_general_one(deep):
    """Parameters without gradients (frozen ones left in the optimizer, as fine-tuning often
    leaves them): the short path takes the step (it took the general path on every step, +30%
    host time, bench/step_pieces.py), and its record is build_stats' to the last bit, a frozen
    module's norm 0; on the parameter cadence too."""
    m = _net(deep=deep)
    n_frozen = _freeze(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    loss = _backward(m)
    probe = Probe(m, opt)
    for with_params in (False, True):
        vec, idx, _ = probe.measure_device(loss, with_params=with_params)
        assert idx is probe._sub_idx and len(idx) == len(probe.params) - n_frozen
        host = vec.tolist()
        ng = len(idx)
        pn = host[ng:-1] if with_params else None
        quick = quick_stats(3, probe, host[:ng], idx, host[-1], pn=pn, lr=0.1)
        full = build_stats(3, probe, np.asarray(host[:ng]), idx,
                           np.asarray(pn) if with_params else None, host[-1], lr=0.1)
        assert quick is not None
        assert quick.grad_norms == full.grad_norms and quick.grad_norm == full.grad_norm
        assert quick.param_norms == full.param_norms and quick.param_norm == full.param_norm
        assert quick.grad_norms[0] == 0.0
    # the same set again: the same index object (the short path's key); another set: a new one
    _, idx2, _ = probe.measure_device(loss, with_params=False)
    assert idx2 is idx
    m[-1].bias.requires_grad_(True)
    _backward(m)
    _, idx3, _ = probe.measure_device(loss, with_params=False)
    assert idx3 is probe._sub_idx and idx3 is not idx and len(idx3) == len(idx) + 1
    # a set seen before (experts routed in turn) comes back as the same object
    m[-1].bias.requires_grad_(False)
    m[-1].bias.grad = None
    _, idx4, _ = probe.measure_device(loss, with_params=False)
    assert idx4 is idx


@contextlib.contextmanager
def _short_path_count():
    """Counts the steps whose record the short path built (``quick_stats`` returned one)."""
    import trainguard.measure as measure_mod
    calls = {"quick": 0}
    real = measure_mod.quick_stats

    def counted(*a, **k):
        out = real(*a, **k)
        calls["quick"] += out is not None
        return out

    measure_mod.quick_stats = counted
    try:
        yield calls
    finally:
        measure_mod.quick_stats = real


def test_a_guard_with_frozen_parameters_stays_on_the_short_path():
    """A Guard over a model whose first layer is frozen but left in the optimizer: its plain
    steps take the short path; the records match the gradients themselves, also after the
    set of frozen parameters changes."""
    m = _net()
    _freeze(m)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False, sample_every=1000, param_norm_every=1000)

    def expected() -> list[float]:
        return [math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in mod.parameters()
                              if p.grad is not None)) for mod in (m[0], m[2])]

    with _short_path_count() as calls:
        for t in range(15):
            if t == 12:
                for p in m[0].parameters():  # unfrozen; the last bias stays frozen
                    p.requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            loss = _backward(m, seed=t)
            want = expected()
            assert g.step(loss) is True
            assert g.core.history[-1].grad_norms == pytest.approx(want, rel=1e-6)
    assert g.core.history[-1].grad_norms[0] > 0
    assert calls["quick"] == 14  # every step but the first (sampled on the first step)
    assert g.core.finding_counts == {}
    # the frozen parameters were named by their own module throughout, not as parameters the
    # model does not own; the module with none of its own gradients is said to have none
    assert g.core.history[-1].modules == ["0", "2"] and g.probe.param_names[:2] == ["0.weight", "0.bias"]
    assert g.core.history[-1].missing_grad_modules == () == g.core.history[-1].frozen_modules
    assert g.core.history[-4].frozen_modules == ("0",) and not g.core.history[-4].missing_grad_modules
    g.close()


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("case", ["unused head", "frozen first layer", "reentrant checkpoint"])
def test_a_module_without_gradients_is_not_a_vanishing_gradient(case, digits):
    """An auxiliary head registered first and used only at evaluation, or a frozen first layer
    left in the optimizer: its gradient is None, recorded as 0.0; the unused head was
    reported as a vanishing gradient ("exactly zero for 20 steps") at step 19. Now the frozen
    layer is not reported, and the head that requires a gradient and never gets one is an
    information note that says so. A real cut graph shows the same way and gets the same note:
    ``torch.utils.checkpoint(use_reentrant=True)`` on an input that needs no gradient leaves the
    checkpointed layer without one (the loss then stays near chance)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    X, Y = digits

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.Linear(64, 10)
            self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if case == "unused head":
                return self.body(x)
            if case == "reentrant checkpoint":
                h = checkpoint(self.aux, x, use_reentrant=True)
            else:
                h = self.aux(x)
            return self.body(h.repeat(1, 7)[:, :64])

    m = Net()
    if case == "frozen first layer":
        m.aux.requires_grad_(False)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        i = torch.randint(0, len(X), (32,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(X[i]), Y[i])
        loss.backward()
        g.step(loss)
    s = g.core.history[-1]
    assert s.modules[0] == "aux" and s.grad_norms[0] == 0.0
    if case == "frozen first layer":
        assert s.frozen_modules == ("aux",) and s.missing_grad_modules == ()
        assert g.core.finding_counts == {}, g.core.findings
    elif case == "reentrant checkpoint":
        assert s.missing_grad_modules == ("aux",)
        (f,) = [f for f in g.core.findings if f.kind == "vanishing_gradient"]
        assert f.step == 19 and f.severity == "info" and f.evidence["cause"] == "no_gradient"
        assert "use_reentrant" in " ".join(f.remedies)
    else:
        assert s.missing_grad_modules == ("aux",) and s.frozen_modules == ()
        (f,) = g.core.findings
        assert f.kind == "vanishing_gradient" and f.severity == "info" and f.where == "aux"
        assert f.evidence["cause"] == "no_gradient" and "exactly zero" not in f.message
        assert not g.core.actions
    g.close()


def test_quick_record_leaves_the_unusual_steps_to_the_general_path():
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    probe = Probe(m, opt)
    norms = [1.0] * len(probe.params)
    assert quick_stats(0, probe, norms, probe._all_idx, 2.0) is not None
    assert quick_stats(0, probe, [math.inf] + norms[1:], probe._all_idx, 2.0) is None
    assert quick_stats(0, probe, [math.nan] + norms[1:], probe._all_idx, 2.0) is None
    assert quick_stats(0, probe, norms, probe._all_idx, math.nan) is None
    # an unknown loss (NaN by convention, loss_known=False) is not a non-finite one
    unknown = quick_stats(0, probe, norms, probe._all_idx, math.nan, loss_known=False)
    assert unknown is not None and not unknown.loss_known and unknown.loss_finite
    # a parameter without a gradient: the grouping of a partial index is numpy's
    assert quick_stats(0, probe, norms[1:], np.arange(1, len(norms)), 2.0) is None


def test_guard_records_the_same_stream_on_either_path():
    """A guarded run's per-step records: the short path (plain steps) and the general path
    (cadence and sampled steps) agree with a recomputation from the gradients themselves."""
    m = _net(norm=True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False, sample_every=7, param_norm_every=5)
    seen = []
    for t in range(30):
        opt.zero_grad()
        loss = _backward(m, seed=t)
        total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in m.parameters()))
        g.step(loss)
        s = g.core.history[-1]
        assert s.step == t and s.loss == pytest.approx(loss.item())
        assert s.grad_norm == pytest.approx(total, rel=1e-5)
        assert len(s.grad_norms) == len(s.modules) == 3  # 0, 1 (BatchNorm), 3
        assert (s.param_norms is not None) == (t % 5 == 0)
        seen.append(s.activations is not None)
    assert seen[0] and seen[7] and not seen[1]
    assert g.core.finding_counts == {}
    g.close()


def test_nonfinite_running_statistics_still_named_at_their_step():
    """A BatchNorm whose running statistics turned NaN on a plain step: the short path hands
    the step to the general one, which names and restores them."""
    m = _net(norm=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = tg.Guard(m, opt, console=False)
    for t in range(13):
        opt.zero_grad()
        loss = _backward(m, seed=t)
        if t == 12:
            m[1].running_var[0] = float("nan")
        g.step(loss)
    f = [f for f in g.core.findings if f.kind == "nonfinite"]
    assert f and f[0].step == 12 and f[0].origin == "buffers"
    assert torch.isfinite(m[1].running_var).all()
    g.close()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_backward_records_no_graph_and_keeps_grad_mode():
    """Gradients that require grad (a double-backward loop): the measurement builds no graph
    through them, and the ambient grad mode is what it was."""
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = tg.Guard(m, opt, console=False)
    for t in range(3):
        opt.zero_grad()
        g_ = torch.Generator().manual_seed(t)
        loss = nn.functional.cross_entropy(m(torch.randn(8, 8, generator=g_)),
                                           torch.randint(0, 4, (8,), generator=g_))
        loss.backward(create_graph=True)
        assert all(p.grad.requires_grad for p in m.parameters())
        vec, _, _ = g.probe.measure_device(loss, with_params=False)
        assert not vec.requires_grad and torch.is_grad_enabled()
        assert g.step(loss) is True
    with torch.no_grad():
        g.probe.measure_device(1.0, with_params=False)
        assert not torch.is_grad_enabled()
    for p in m.parameters():
        p.grad = None  # the create_graph gradients hold a reference cycle through the graph
    g.close()


def _eager_ema(stream, ema=0.9):
    out = None
    for norms in stream:
        gl = np.log(np.maximum(np.asarray(norms, dtype=float), 1e-45))
        out = gl if out is None else ema * out + (1 - ema) * gl
    return out


def test_grad_explosion_module_average_folds_to_the_same_numbers():
    """The per-module log-norm average is folded in batches: the same values as folding it
    every step, whenever it is read (a finding, state_dict), and none of it after reset."""
    rng = np.random.RandomState(0)
    stream = [list(np.exp(rng.randn(3) * 0.1) * [1.0, 2.0, 0.5]) for _ in range(150)]
    d = GradExplosionDetector()
    for i, g in enumerate(stream):
        assert d.update(StepStats(step=i, loss=1.0, grad_norm=float(np.linalg.norm(g)),
                                  modules=["a", "b", "c"], grad_norms=g)) == []
    assert len(d._pending) == 150 % d._FOLD
    state = d.state_dict()
    assert d._pending == []
    np.testing.assert_array_equal(np.asarray(state["module_log_ema"]), _eager_ema(stream))
    # a jump names the module that grew most against its own average
    jump = [1.0, 2.0, 500.0]
    f = d.update(StepStats(step=150, loss=1.0, grad_norm=float(np.linalg.norm(jump)),
                           modules=["a", "b", "c"], grad_norms=jump))
    assert f and f[0].where == "c"
    d.reset()
    assert d._pending == [] and d.module_log_ema is None
    # a restored state starts with nothing pending
    d2 = GradExplosionDetector()
    d2.update(StepStats(step=0, loss=1.0, grad_norm=1.0, modules=["a"], grad_norms=[1.0]))
    d2.load_state_dict(state)
    assert d2._pending == []
    np.testing.assert_array_equal(d2.module_log_ema, _eager_ema(stream))


def test_vanishing_shortcut_resets_like_the_search():
    """The common-step shortcut (every module within ``ratio`` of the largest) does what the
    first-live-module search does: the streak and the report re-arm."""
    d = VanishingGradientDetector(patience=3)
    mods = ["in", "out"]

    def s(i, g):
        return StepStats(step=i, loss=1.0, grad_norm=1.0, modules=mods, grad_norms=g)

    assert d.update(s(0, [1e-6, 1.0])) == [] and d.streak == 1
    assert d.update(s(1, [0.5, 1.0])) == [] and d.streak == 0
    assert [f.step for i in range(2, 6) for f in d.update(s(i, [1e-6, 1.0]))] == [4]
    assert d.reported
    d.update(s(6, [0.5, 1.0]))
    assert not d.reported and d.streak == 0
    # a dead first layer (exactly zero) is not the shortcut's case: the search decides
    assert d.update(s(7, [0.0, 1e-7, 1.0])) == [] and d.streak == 1


def test_capture_records_autocast_as_before():
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = tg.Guard(m, opt, console=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(4, 8))
    cap = g._capture
    assert cap is not None
    assert cap.autocast is not None and cap.autocast["cpu"] == [True, "torch.bfloat16"]
    cap.release()
    assert cap.autocast is None
    m(torch.randn(4, 8))
    assert cap.autocast is not None and cap.autocast["cpu"][0] is False
    g.close()


def test_sampled_only_rules_rest_on_plain_steps_with_the_same_findings():
    """DeadUnits, Saturation, OptimizerStall and LogitDrift read only sampled fields: the core
    skips them on plain steps, and the findings of a real run are those of calling every
    detector on every step."""
    from trainguard.core import DecisionCore
    from trainguard.detect import default_detectors

    class Counting(GradExplosionDetector):
        sampled = "activations"
        calls = 0

        def update(self, s):
            Counting.calls += 1
            return []

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        m[2].bias.fill_(-50.0)  # the second ReLU layer dies: a dead_units finding
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False, sample_every=10, policy=tg.Policy.monitor_only())
    g.core.detectors.append(Counting())
    for t in range(60):
        opt.zero_grad()
        g.step(_backward_any(m, t))
    stream = list(g.core.history)
    # called on the sampled steps and the steps after them (the update's optimizer state)
    sampled = [s for s in stream if s.activations is not None or s.optimizer_state is not None
               or s.output_log_z is not None]
    assert Counting.calls == len(sampled) < len(stream) // 4
    every = DecisionCore(detectors=default_detectors())
    every._every_src = every.detectors  # as if every detector were called each step
    every._every = every.detectors
    expected = [(f.kind, f.step, f.where) for s in stream
                for f in every.detect(s, infer_chance=lambda _: g.core.chance_loss)]
    got = [(f.kind, f.step, f.where) for f in g.core.findings]
    assert got == expected
    assert any(k == "dead_units" for k, _, _ in got)
    g.close()


def _backward_any(m: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    loss = nn.functional.cross_entropy(m(torch.randn(32, 8, generator=gen)),
                                       torch.randint(0, 4, (32,), generator=gen))
    loss.backward()
    return loss


def test_a_loop_that_shows_no_loss_stays_on_the_short_path():
    """guard.step() without a loss (a framework that keeps it): the record is the short path's,
    the loss unknown, no finding; the general path is not taken on every step."""
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = tg.Guard(m, opt, console=False, sample_every=1000, param_norm_every=1000)
    with _short_path_count() as calls:
        for t in range(12):
            opt.zero_grad()
            _backward(m, seed=t)
            assert g.step() is True
    s = g.core.history[-1]
    assert not s.loss_known and s.grads_finite and s.grad_norm > 0
    assert calls["quick"] == 11  # every step but the first (sampled on the first step)
    assert g.core.finding_counts == {}
    g.close()


def _sampled_reference_run(dtype: torch.dtype, opt_name: str):
    """A Guard sampling every step, and the sampled statistics recomputed from scratch beside
    it: update-to-weight ratio per module, Adam's epsilon-dominated fraction, 16-bit
    swamping."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
    if opt_name == "adam":
        o: torch.optim.Optimizer = torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-3)
    else:
        o = torch.optim.SGD(m.parameters(), lr=1e-4)  # small updates: bf16 swamps some
    g = tg.Guard(m, o, console=False, sample_every=1)
    probe = g.probe
    gen = torch.Generator().manual_seed(1)
    got, want = [], []
    for step in range(6):
        x, y = torch.randn(16, 8, generator=gen).to(dtype), torch.randint(0, 4, (16,), generator=gen)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        before = [p.detach().clone() for p in probe.params]
        grads = [p.grad.detach().clone() for p in probe.params]
        g.step(loss)
        st = g.history[-1]
        d2 = np.zeros(len(probe.modules))
        b2 = np.zeros(len(probe.modules))
        for i, (p, b) in enumerate(zip(probe.params, before)):
            d2[probe.group[i]] += float((p.detach().double() - b.double()).square().sum())
            b2[probe.group[i]] += float(b.double().square().sum())
        ratios = np.sqrt(d2) / np.sqrt(b2)
        got.append(("ratios", step, st.update_ratios))
        want.append(("ratios", step, ratios.tolist()))
        post: dict = {}
        if dtype == torch.bfloat16:
            nz = sum(int((gr != 0).sum()) for gr in grads)
            same = sum(int(((gr != 0) & (p.detach() == b)).sum())
                       for gr, p, b in zip(grads, probe.params, before))
            post["swamped_fraction"] = same / nz
        if opt_name == "adam":
            grp = o.param_groups[0]
            t = float(o.state[probe.params[0]]["step"])
            thr = grp["eps"] ** 2 * (1 - grp["betas"][1] ** t)
            v = torch.cat([o.state[p]["exp_avg_sq"].reshape(-1).float() for p in probe.params])
            seen = int((v != 0).sum())
            post["eps_dominated_fraction"] = int(((v > 0) & (v < thr)).sum()) / seen
        got.append(("post", step, g.measure.post))
        want.append(("post", step, post))
    g.close()
    return got, want


@pytest.mark.parametrize("dtype,opt_name", [(torch.float32, "adam"), (torch.bfloat16, "sgd"),
                                            (torch.bfloat16, "adam")])
def test_sampled_statistics_equal_a_reference_computation(dtype, opt_name):
    """The sampled step's statistics (update ratios in place of a second copy, int32 counts)
    against the same quantities computed from scratch in fp64 (to fp32 rounding)."""
    got, want = _sampled_reference_run(dtype, opt_name)
    for (kind, step, a), (_k, _s, b) in zip(got, want):
        if kind == "ratios":
            assert a == pytest.approx(b, rel=1e-5), (step, a, b)
        else:
            a = {k: v for k, v in (a or {}).items() if k in b}
            assert a == pytest.approx(b, rel=1e-6), (step, a, b)
    assert any(k == "post" and b.get("swamped_fraction", 0) > 0 for k, _s, b in want) \
        or dtype != torch.bfloat16
    assert any(k == "post" and b.get("eps_dominated_fraction", 0) > 0 for k, _s, b in want) \
        or opt_name != "adam"


@pytest.mark.parametrize("how", ["swap", "load", "new entry"])
def test_cadence_read_follows_the_optimizer_states_tensors(how):
    """The parameter cadence reads the optimizer state through a cached layout: a state tensor
    swapped in place of another, a whole state loaded, or an entry added later is still the
    one read, and its corruption is found at the next cadence step."""
    m = _net()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False)
    w = m[2].weight
    for t in range(22):
        opt.zero_grad()
        loss = _backward(m, seed=t)
        if t == 12:
            if how == "swap":
                opt.state[w]["exp_avg_sq"] = opt.state[w]["exp_avg_sq"].clone()
            elif how == "load":
                opt.load_state_dict(opt.state_dict())
            else:  # an entry the optimizer did not have at the last read
                opt.state[w]["extra_buffer"] = torch.zeros_like(w)
        if t == 15:
            key = "extra_buffer" if how == "new entry" else "exp_avg_sq"
            opt.state[w][key][0, 0] = float("inf")
        g.step(loss)
    f = [f for f in g.core.findings if f.kind == "nonfinite"]
    assert f and f[0].step == 20 and f[0].origin == "optimizer" and f[0].where == "2", f
    g.close()


def test_the_update_ratio_handed_to_the_detectors_is_the_nan_median():
    """The sampled step's median update ratio (read by the plateau rule) is np.nanmedian's
    value, with a module that has no update (a frozen layer: NaN ratio) in the list."""
    m = _net()
    m[0].weight.requires_grad_(False)  # no update there; its module keeps a bias
    m[2].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    g = tg.Guard(m, opt, console=False, sample_every=2)
    seen = 0
    for t in range(8):
        opt.zero_grad()
        loss = _backward(m, seed=t)
        g.step(loss)
        s = g.core.history[-1]
        if s.update_ratios is not None:
            assert g.measure.post is not None
            assert g.measure.post["update_ratio"] == float(np.nanmedian(s.update_ratios))
            seen += 1
    assert seen >= 3
    g.close()


def test_a_parameter_only_the_optimizer_holds_is_named_apart_from_the_model():
    """A learnable temperature kept beside the model (in the optimizer, not in the model) was
    grouped under "(root)", the model's root module: the no-gradient note said "(root)
    received no gradient" when the loss did not use it."""
    from trainguard.stats import OUTSIDE_MODEL
    m = _net()
    temp = nn.Parameter(torch.tensor(1.0))
    opt = torch.optim.Adam(list(m.parameters()) + [temp], lr=1e-3)
    g = tg.Guard(m, opt, console=False)
    for t in range(25):
        opt.zero_grad(set_to_none=True)
        g.step(_backward(m, seed=t))  # the loss does not use the temperature
    assert g.core.history[-1].modules[-1] == OUTSIDE_MODEL
    notes = [f for f in g.findings if f.evidence.get("cause") == "no_gradient"]
    assert len(notes) == 1 and notes[0].where == OUTSIDE_MODEL
    assert "(root)" not in notes[0].message
    g.close()


@pytest.mark.parametrize("sync", [True, "deferred"])
def test_parameters_added_with_add_param_group_are_measured_and_rolled_back(sync):
    """Gradual unfreezing by ``optimizer.add_param_group``: the probe was fixed at the Guard's
    construction, so the added layer was never measured nor snapshotted, and a NaN written
    into it was rolled back 8 times (to snapshots without it) until the run halted."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x.sum(1, keepdim=True)
    opt = torch.optim.Adam(list(m[2].parameters()), lr=1e-2)
    g = tg.Guard(m, opt, console=False, snapshot_every=10)
    for t in range(60):
        if t == 20:
            opt.add_param_group({"params": list(m[0].parameters()), "lr": 1e-3})
        if t == 45:
            with torch.no_grad():
                m[0].weight[0, 0] = float("nan")
        opt.zero_grad(set_to_none=True)
        loss = (m(x) - y).pow(2).mean()
        loss.backward()
        g.step(loss)
        if t == 0:
            first = loss.item()
        if t == 21:
            assert g.core.history[-1].modules == ["0", "2"]
            assert g.core.history[-1].grad_norms[0] > 0
    assert g.core.counts["param_groups_changed"] == 1
    assert g.action_counts["rollback"] == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert loss.item() < 0.5 * first
    g.close()
