"""The deferred mode's backup (``Guard(sync="deferred")``; ``sync=False`` on an accelerator): a
skip decided on the device restores exactly what the update changed, and the backup holds one
buffer per tensor it covers, however long the run."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import trainguard as tg

#: the CUDA variants run where CUDA is present (bench/gpu.sh); the deferred mode is the
#: default ``sync=False`` there
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _setup(opt_name: str, device: str = "cpu") -> tuple[nn.Module, torch.optim.Optimizer, tg.Guard]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    o = {"sgd": lambda: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9),
         "adam": lambda: torch.optim.Adam(m.parameters(), lr=1e-3)}[opt_name]()
    return m, o, tg.Guard(m, o, sync="deferred", console=False)


def _step(m: nn.Module, o: torch.optim.Optimizer, g: tg.Guard, t: int, nan: bool = False) -> None:
    gen = torch.Generator().manual_seed(t)
    dev = next(m.parameters()).device
    x = torch.randn(8, 16, generator=gen).to(dev)
    y = torch.randint(0, 4, (8,), generator=gen).to(dev)
    o.zero_grad()
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    if nan:
        m[0].weight.grad[0, 0] = math.nan
    g.step(loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_the_backup_holds_one_buffer_per_tensor_however_long_the_run(opt_name, device):
    """The buffers were keyed by ``id(p.data)``, a new object at every step: the dictionary
    gained a parameter-sized buffer at most steps (107 buffers for 8 tensors after 300 steps)."""
    m, o, g = _setup(opt_name, device)
    for t in range(120):
        _step(m, o, g, t)
    backup = g._deferred.backup
    assert backup is not None
    n_state = sum(isinstance(v, torch.Tensor) for p in m.parameters() for v in o.state[p].values())
    n = len(list(m.parameters())) + n_state
    assert len(backup.bufs) == n
    held = sum(b.numel() for b in backup.bufs)
    assert held == sum(p.numel() for p in m.parameters()) + sum(
        v.numel() for p in m.parameters() for v in o.state[p].values() if isinstance(v, torch.Tensor))
    g.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_a_skip_on_the_device_restores_weights_and_state_exactly(opt_name, device):
    m, o, g = _setup(opt_name, device)
    for t in range(5):
        _step(m, o, g, t)
    before = [p.detach().clone() for p in m.parameters()]
    state = [{k: v.clone() for k, v in o.state[p].items()} for p in m.parameters()]
    _step(m, o, g, 5, nan=True)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    for p, st in zip(m.parameters(), state):
        for k, v in st.items():
            if o.state[p][k].device == p.device:  # selected on the device at once
                assert torch.equal(o.state[p][k], v), k
    g.close()  # reads every pending flag (on CUDA up to 4 steps late) and undoes the rest:
    # Adam's host-side step counters beside CUDA weights
    for p, st in zip(m.parameters(), state):
        for k, v in st.items():
            assert torch.equal(o.state[p][k], v), k
    assert any(a.kind == "skip" and a.step == 5 for a in g.actions)
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_skip_of_the_first_update_leaves_no_state_behind():
    """State created by the skipped update (the first one) is reset to its initial zeros."""
    m, o, g = _setup("adam")
    before = [p.detach().clone() for p in m.parameters()]
    _step(m, o, g, 0, nan=True)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    for p in m.parameters():
        for k, v in o.state[p].items():
            if k != "step":  # Adam's CPU step counter: undone when the host reads the flag
                assert not v.any(), k
    g.close()
