"""Activations called as functions in forward (issue #13, item 2) are seen on sampled steps,
named after the module whose output they were applied to."""
import pytest
import torch
from torch import nn

import trainguard as tg


class Functional(nn.Module):
    """The 64-128-64-10 net of the issue, written the way many published models are."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)
        self.act = act

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class Modules(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def _run(model, first, steps=60):
    torch.manual_seed(0)
    with torch.no_grad():
        first.bias.fill_(-100.0)  # born dead: no unit of the first layer ever fires
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = tg.Guard(model, opt, console=False, policy=tg.Policy.monitor_only())
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(64, 64, generator=gen)
        y = (x[:, 0] > 0).long()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        g.step(loss)
    g.close()
    return g


@pytest.mark.parametrize("act", [torch.relu, nn.functional.relu, lambda x: x.relu()])
def test_born_dead_units_are_named_with_functional_relu(act):
    torch.manual_seed(0)
    m = Functional(act)
    g = _run(m, m.fc1)
    dead = [f for f in g.findings if f.kind == "dead_units"]
    assert dead and dead[0].where == "fc1.relu" and dead[0].step == 0, [str(f) for f in g.findings]


def test_module_relu_named_as_before_and_not_twice():
    torch.manual_seed(0)
    m = Modules()
    g = _run(m, m.net[0])
    dead = [f for f in g.findings if f.kind == "dead_units"]
    assert dead and dead[0].where == "net.1"
    names = set(g.history[0].activations)
    assert names == {"net.1", "net.3"}  # nn.ReLU's own F.relu call is not counted again


def test_functional_tanh_saturation_and_healthy_control():
    torch.manual_seed(0)
    m = Functional(torch.tanh)
    with torch.no_grad():
        m.fc1.weight.mul_(200.0)  # every tanh unit of the first layer saturated
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False, sample_every=5, policy=tg.Policy.monitor_only())
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        x = torch.randn(64, 64, generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
        loss.backward()
        g.step(loss)
    g.close()
    sat = [f for f in g.findings if f.kind == "saturation"]
    assert sat and sat[0].where == "fc1.tanh", [str(f) for f in g.findings]
    # a healthy functional net: activations seen, no finding
    torch.manual_seed(1)
    h = Functional(torch.relu)
    opt = torch.optim.Adam(h.parameters(), lr=1e-3)
    g = tg.Guard(h, opt, console=False)
    for _ in range(60):
        x = torch.randn(64, 64, generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(h(x), (x[:, 0] > 0).long())
        loss.backward()
        g.step(loss)
    g.close()
    assert set(g.history[0].activations) == {"fc1.relu", "fc2.relu"}
    assert not [f for f in g.findings if f.severe]


def test_doctor_sees_functional_activations():
    torch.manual_seed(0)
    m = Functional(torch.relu)
    with torch.no_grad():
        m.fc1.bias.fill_(-100.0)
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        x = torch.randn(64, 64, generator=gen)
        data.append((x, (x[:, 0] > 0).long()))
    rep = tg.doctor(m, nn.functional.cross_entropy, data, torch.optim.Adam(m.parameters(), lr=1e-3),
                    steps=5, lr_range=False, precision=False, noise=False)
    names = [lv.name for lv in rep.layers]
    assert "fc1.relu" in names and "fc2.relu" in names and names.index("fc1.relu") < names.index("fc2")
    dead = [f for f in rep.findings if f.kind == "dead_units"]
    assert dead and "fc1.relu" in (dead[0].where + " ".join(dead[0].locations)), [str(f) for f in rep.findings]
    # modules: no functional duplicate of nn.ReLU's output
    mm = Modules()
    rep2 = tg.doctor(mm, nn.functional.cross_entropy, data, steps=2, lr_range=False,
                     precision=False, noise=False)
    assert [lv.name for lv in rep2.layers] == ["net.0", "net.1", "net.2", "net.3", "net.4"]
