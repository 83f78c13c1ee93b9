"""Optimizers that evaluate the loss several times per step (``torch.optim.LBFGS``, whose
``step`` requires a closure: pytorch/examples' time_sequence_prediction trains with it).
Before, ``GuardedOptimizer(LBFGS(...)).step(closure)`` died inside the Guard with
"LBFGS.step() missing 1 required positional argument: 'closure'"."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.remedies.snapshot import SnapshotStore


def _problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = torch.sin(x.sum(1, keepdim=True))
    return m, x, y


def _closure(m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             evals: list, poison: set[int] = frozenset()):  # type: ignore[assignment]
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        if len(evals) in poison:
            m[0].weight.grad[0, 0] = math.nan
        evals.append(loss.item())
        return loss
    return closure


def _run(kind: str, steps: int = 4, poison: set[int] = frozenset(), **opts):  # type: ignore[assignment]
    m, x, y = _problem()
    inner = torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=5)
    evals: list[float] = []
    g = None
    if kind == "bare":
        opt: torch.optim.Optimizer = inner
    elif kind == "guarded_optimizer":
        opt = tg.GuardedOptimizer(inner, m, console=False, **opts)
        g = opt.guard
    else:  # guard.step(closure=...) or guard.step(loss, closure=...) in a plain loop
        opt = inner
        g = tg.Guard(m, inner, console=False, **opts)
    applied = []
    for _ in range(steps):
        c = _closure(m, opt, x, y, evals, poison)
        if kind == "guard":
            assert g is not None
            applied.append(g.step(closure=c))
        elif kind == "guard_loss":  # the user evaluates once, then hands loss and closure over
            assert g is not None
            applied.append(g.step(c(), closure=c))
        else:
            opt.step(c)
    return m, inner, evals, g, applied


@pytest.mark.parametrize("kind", ["guarded_optimizer", "guard", "guard_loss"])
def test_guarded_lbfgs_takes_exactly_the_bare_steps(kind):
    """Same weights to the bit and the same number of closure evaluations as the bare
    optimizer: the Guard's own measurement is the optimizer's first evaluation, not an
    extra one."""
    mb, _, eb, _, _ = _run("bare")
    mg, inner, eg, g, applied = _run(kind)
    assert len(eg) == len(eb) and eg == eb
    assert all(torch.equal(a, b) for a, b in zip(mb.parameters(), mg.parameters()))
    assert g is not None and not g.findings and not g.actions
    assert applied in ([], [True] * 4)
    assert inner.state[next(iter(mg.parameters()))]["n_iter"] == 4 * 5


def test_a_nan_first_evaluation_is_skipped_and_lbfgs_state_untouched():
    first_of_step3 = 10  # 5 evaluations per step (max_iter=5): 0-4 step 0, 5-9 step 1
    m, inner, evals, g, applied = _run("guard", steps=4, poison={first_of_step3})
    assert applied == [True, True, False, True]
    assert g is not None
    assert [f.step for f in g.findings if f.kind == "nonfinite"] == [2]
    assert any(a.kind == "skip" and a.step == 2 for a in g.actions)
    # LBFGS never ran on the skipped step: 3 steps of 5 iterations, one evaluation for the skip
    assert inner.state[next(iter(m.parameters()))]["n_iter"] == 3 * 5
    assert len(evals) == 3 * 5 + 1
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_nan_inside_the_line_search_is_rolled_back():
    """A NaN gradient in one of LBFGS's later evaluations (inside its step, after the Guard's
    decision) corrupts the weights; the next step names it (origin: the optimizer) and rolls
    back, LBFGS's history with the weights."""
    m, inner, evals, g, applied = _run("guard", steps=5, poison={11})
    assert applied == [True, True, True, False, True]
    assert g is not None
    nf = [f for f in g.findings if f.kind == "nonfinite"]
    assert [(f.step, f.origin) for f in nf] == [(3, "optimizer")]
    assert any(a.kind == "rollback" and a.step == 3 for a in g.actions)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    st = inner.state[next(iter(m.parameters()))]
    assert all(torch.isfinite(d).all() for d in st["old_dirs"] + st["old_stps"])


def test_lbfgs_without_a_closure_is_a_clear_error_before_anything_changes():
    m, x, y = _problem()
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5)
    g = tg.Guard(m, opt, console=False)
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    loss = nn.functional.mse_loss(m(x), y)
    loss.backward()
    with pytest.raises(TypeError, match=r"LBFGS\.step needs a closure.*guard\.step\(closure=closure\)"):
        g.step(loss)
    assert g.core.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    with pytest.raises(TypeError, match="closure must be callable"):
        g.step(closure=loss)  # type: ignore[arg-type]


def test_lbfgs_refuses_a_gradscaler_and_the_deferred_mode():
    m, _, _ = _problem()
    with pytest.raises(ValueError, match="GradScaler does not support closures"):
        tg.Guard(m, torch.optim.LBFGS(m.parameters()), console=False,
                 scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="sync=True"):
        tg.Guard(m, torch.optim.LBFGS(m.parameters()), console=False, sync="deferred")


def test_other_optimizers_get_no_closure_and_evaluate_once():
    """Adam with a closure (Lightning steps this way): the closure runs once per step, as
    before; Adam would run it again if it were handed on."""
    m, x, y = _problem()
    inner = torch.optim.Adam(m.parameters(), lr=1e-2)
    opt = tg.GuardedOptimizer(inner, m, console=False)
    evals: list[float] = []
    for _ in range(3):
        out = opt.step(_closure(m, opt, x, y, evals))
        assert isinstance(out, torch.Tensor)
    assert len(evals) == 3
    m2, x2, y2 = _problem(1)
    o2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    g2 = tg.Guard(m2, o2, console=False)
    ev2: list[float] = []
    for _ in range(3):
        assert g2.step(closure=_closure(m2, o2, x2, y2, ev2))
    assert len(ev2) == 3 and g2.core.step_count == 3


def test_a_rollback_restores_lbfgs_history_as_it_was():
    """LBFGS keeps its curvature history in lists it appends to and pops from in place: a
    snapshot must hold copies, or a rollback restores the history of the abandoned steps."""
    m, x, y = _problem()
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3, history_size=4)
    evals: list[float] = []
    store = SnapshotStore(m, opt, list(m.parameters()))
    opt.step(_closure(m, opt, x, y, evals))
    st = opt.state[next(iter(m.parameters()))]
    dirs = [d.clone() for d in st["old_dirs"]]
    n_iter = st["n_iter"]
    snap = store.take(1)
    for _ in range(3):
        opt.step(_closure(m, opt, x, y, evals))
    assert len(st["old_dirs"]) > len(dirs)
    store.restore(snap)
    st = opt.state[next(iter(m.parameters()))]
    assert st["n_iter"] == n_iter
    assert len(st["old_dirs"]) == len(dirs)
    assert all(torch.equal(a, b) for a, b in zip(st["old_dirs"], dirs))
    # training on from the restored state leaves the snapshot's own lists as they were
    opt.step(_closure(m, opt, x, y, evals))
    assert len(snap.optim[0]["old_dirs"]) == len(dirs)
    assert snap.nbytes() > sum(p.numel() * 4 for p in m.parameters()) * (1 + 2 * len(dirs))
