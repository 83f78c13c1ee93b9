"""Structural repair inside the run (issue #13, item 1): Policy(structural="repair")."""
import pytest
import torch
from torch import nn

import trainguard as tg


def _train(model, X, y, policy, steps=300, lr=1e-3, opt="adam"):
    torch.manual_seed(0)
    o = (torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam"
         else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    g = tg.Guard(model, o, console=False, policy=policy) if policy is not None else None
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 1500, (64,), generator=gen)
        o.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        g.step(loss) if g is not None else o.step()
    if g is not None:
        g.close()
    with torch.no_grad():
        acc = float((model(X[1500:]).argmax(1) == y[1500:]).float().mean())
    return g, acc


def _born_dead():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        m[0].bias.fill_(-100.0)
    return m


def _deep_sigmoid():
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64), nn.Sigmoid()]
    for _ in range(9):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def test_born_dead_relu_is_repaired_in_the_run(digits):
    X, y = digits
    _, bare = _train(_born_dead(), X, y, None)
    g_rep, acc_rep = _train(_born_dead(), X, y, tg.Policy())
    g, acc = _train(_born_dead(), X, y, tg.Policy(structural="repair"))
    assert bare < 0.2 and acc_rep < 0.2  # reported, not repaired
    rs = [a for a in g.actions if a.kind == "restructure"]
    assert rs and rs[0].detail["finding"] == "dead_units"
    assert rs[0].detail["remedy"] == "act:leaky+init:he"
    assert any("LeakyReLU" in c for c in rs[0].detail["changes"]), rs[0].detail
    assert isinstance(g.model[1], nn.LeakyReLU)
    assert acc > 0.85, acc


def test_deep_sigmoid_vanishing_is_repaired_in_the_run(digits):
    X, y = digits
    _, bare = _train(_deep_sigmoid(), X, y, None, opt="sgd", lr=0.1)
    g, acc = _train(_deep_sigmoid(), X, y, tg.Policy(structural="repair"), opt="sgd", lr=0.1)
    rs = [a for a in g.actions if a.kind == "restructure"]
    assert rs and rs[0].detail["finding"] == "vanishing_gradient", [str(f) for f in g.findings]
    assert rs[0].detail["remedy"] == "act:relu+init:he"
    assert bare < 0.2 and acc > 0.7, (bare, acc)  # 0.09 bare, 0.79 repaired (seed 0)


def test_healthy_run_is_untouched_and_undo_works(digits):
    X, y = digits
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    g, acc = _train(m, X, y, tg.Policy(structural="repair"), steps=150)
    assert not [a for a in g.actions if a.kind == "restructure"] and acc > 0.8
    # undo puts back the structure and the weights from before the change
    m = _born_dead()
    before = [p.detach().clone() for p in m.parameters()]
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, o, console=False, policy=tg.Policy(structural="repair"))
    o.zero_grad()
    loss = nn.functional.cross_entropy(m(X[:64]), y[:64])
    loss.backward()
    assert g.step(loss) is False  # the step of the change applies no update
    assert isinstance(m[1], nn.LeakyReLU)
    assert g.undo_restructure() is True
    assert isinstance(m[1], nn.ReLU)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(p is q for p, q in zip(m.parameters(), o.param_groups[0]["params"]))
    g.close()


def test_policy_contract():
    assert tg.Policy().structural == "report"
    assert "restructure" in tg.ACTION_KINDS
    with pytest.raises(ValueError, match="structural must be"):
        tg.Policy(structural="fix")
    with pytest.raises(ValueError, match="not a ladder rung"):
        tg.Policy({"dead_units": ("restructure",)})
