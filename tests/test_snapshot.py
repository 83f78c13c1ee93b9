"""SnapshotStore on its own: what a rollback restores is exactly what was there when the
snapshot was taken, whatever happened in between (real small models and optimizers; on CUDA
too when it is present: the host copies are then pinned and asynchronous, bench/gpu.sh)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainguard.remedies.snapshot import SnapshotStore

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).to(device)


def _train(m: nn.Module, o: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    dev = next(m.parameters()).device
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen).to(dev)
        y = torch.randint(0, 3, (32,), generator=gen).to(dev)
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()


def _state(m: nn.Module, o: torch.optim.Optimizer) -> tuple[list, list, list]:
    """Copies of every parameter, buffer and optimizer-state value (tensors cloned)."""
    params = [p.detach().clone() for p in m.parameters()]
    bufs = [b.clone() for b in m.buffers()]
    st = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in o.state[p].items()}
          for p in m.parameters() if p in o.state]
    return params, bufs, st


def _same(a: tuple[list, list, list], b: tuple[list, list, list]) -> bool:
    pa, ba, sa = a
    pb, bb, sb = b
    if len(pa) != len(pb) or len(ba) != len(bb) or len(sa) != len(sb):
        return False
    if not all(torch.equal(x, y) for x, y in zip(pa + ba, pb + bb)):
        return False
    for x, y in zip(sa, sb):
        if x.keys() != y.keys():
            return False
        for k in x:
            vx, vy = x[k], y[k]
            if isinstance(vx, torch.Tensor):
                if not (isinstance(vy, torch.Tensor) and vx.dtype == vy.dtype
                        and vx.device == vy.device and torch.equal(vx, vy)):
                    return False
            elif vx != vy:
                return False
    return True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt", ["adam", "sgd_momentum", "rmsprop"])
def test_restore_brings_back_exactly_the_state_of_the_snapshot(opt, device):
    m = _model(device)
    o = {"adam": lambda: torch.optim.Adam(m.parameters(), lr=1e-2),
         "sgd_momentum": lambda: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
         "rmsprop": lambda: torch.optim.RMSprop(m.parameters(), lr=1e-2)}[opt]()
    store = SnapshotStore(m, o, list(m.parameters()), keep=2)
    _train(m, o, 3)
    want = _state(m, o)
    rng = torch.get_rng_state()
    snap = store.take(3)
    if device == "cuda":  # host copies in pinned memory, made asynchronously
        assert all(t.device.type == "cpu" and t.is_pinned() for t in snap.params + snap.buffers)
        assert snap.event is not None
    _train(m, o, 4, seed=2)  # moves weights, running statistics, moments, step counts
    torch.randn(5)
    assert not _same(_state(m, o), want)
    store.restore(store.snaps[-1], at_step=7)
    assert _same(_state(m, o), want)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("device", DEVICES)
def test_snapshot_buffers_are_reused_and_still_copies_not_aliases(device):
    """Steady state: the oldest snapshot's tensors are refilled (no new allocation), and what
    they hold is the state at the new step, unaffected by the training that follows."""
    m = _model(device)
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    store = SnapshotStore(m, o, list(m.parameters()), keep=2)
    _train(m, o, 2)
    first = store.take(2)
    held = [id(t) for t in first.params + first.buffers] + [
        id(v) for st in first.optim for v in st.values() if isinstance(v, torch.Tensor)]
    _train(m, o, 2)
    store.take(4)
    _train(m, o, 2)
    want = _state(m, o)
    third = store.take(6)  # refills the step-2 snapshot's tensors
    assert [id(t) for t in third.params + third.buffers] + [
        id(v) for st in third.optim for v in st.values() if isinstance(v, torch.Tensor)] == held
    assert [s.step for s in store.snaps] == [4, 6]
    for p, s in zip(m.parameters(), third.params):
        assert s.data_ptr() != p.data_ptr()
    _train(m, o, 3, seed=3)
    store.restore(third, at_step=9)
    assert _same(_state(m, o), want)


@pytest.mark.parametrize("device", DEVICES)
def test_state_that_appears_after_a_snapshot_is_copied_in_the_next_one(device):
    """The first snapshot comes before any optimizer state exists (the Guard takes one before
    the first update); a later one reuses its tensors and must copy the new moments too."""
    m = _model(device)
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    store = SnapshotStore(m, o, list(m.parameters()), keep=1)
    store.take(0)
    assert all(st == {} for st in store.snaps[0].optim)
    _train(m, o, 3)
    want = _state(m, o)
    store.take(3)
    _train(m, o, 2, seed=4)
    store.restore(store.snaps[-1], at_step=5)
    assert _same(_state(m, o), want)
    # and back to before any state: restoring the empty state removes the moments
    m2 = _model(device)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    s2 = SnapshotStore(m2, o2, list(m2.parameters()), keep=1)
    s2.take(0)
    _train(m2, o2, 2)
    s2.restore(s2.snaps[-1])
    assert len(o2.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), _model(device).parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_a_state_dict_loaded_between_snapshots_is_copied_and_restored(device):
    m = _model(device)
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    store = SnapshotStore(m, o, list(m.parameters()), keep=2)
    _train(m, o, 2)
    store.take(2)
    o.load_state_dict(o.state_dict())  # new state tensors (and dict) for the same values
    _train(m, o, 2)
    want = _state(m, o)
    snap = store.take(4)
    _train(m, o, 2, seed=5)
    store.restore(snap, at_step=6)
    assert _same(_state(m, o), want)


def test_mixed_dtypes_are_kept_in_their_own_dtype():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4).double(), nn.Linear(4, 4).to(torch.bfloat16))

    class Cast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m[1](self.m[0](x.double()).to(torch.bfloat16)).float()

    net = Cast()
    o = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    store = SnapshotStore(net, o, list(net.parameters()), keep=2)

    def train(n: int) -> None:
        for _ in range(n):
            o.zero_grad()
            net(torch.randn(8, 4)).square().mean().backward()
            o.step()
    train(2)
    want = _state(net, o)
    snap = store.take(2)
    assert [t.dtype for t in snap.params] == [p.dtype for p in net.parameters()]
    assert store.verify(1e15, 1e30)
    train(3)
    store.restore(snap)
    assert _same(_state(net, o), want)


@pytest.mark.parametrize("where, value", [("param", math.nan), ("param", math.inf),
                                          ("param", 3e16), ("state", math.inf),
                                          ("state", 3e31), ("buffer", math.nan)])
@pytest.mark.parametrize("device", DEVICES)
def test_verify_refuses_state_a_rollback_must_not_restore(where, value, device):
    m = _model(device)
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    _train(m, o, 2)
    store = SnapshotStore(m, o, list(m.parameters()))
    assert store.verify(1e15, 1e30)
    with torch.no_grad():
        if where == "param":
            m[3].weight[0, 0] = value
        elif where == "state":
            o.state[m[0].bias]["exp_avg_sq"][1] = value
        else:
            m[1].running_var[2] = value
    assert not store.verify(1e15, 1e30)


def test_verify_ignores_what_is_allowed_to_be_large():
    """Buffers have no size limit (a BatchNorm's num_batches_tracked, a large running
    variance), only finiteness; the step count of Adam is not a state tensor to check."""
    m = _model()
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    _train(m, o, 2)
    with torch.no_grad():
        m[1].running_var.fill_(1e20)
    store = SnapshotStore(m, o, list(m.parameters()))
    assert store.verify(1e15, 1e30)
