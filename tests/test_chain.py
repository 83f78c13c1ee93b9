"""Several optimizers of one model as one step (trainguard.chain): torch.optim.Muon for the
hidden matrices beside AdamW for the rest, stepped, skipped, rolled back and saved together."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.chain import OptimizerChain

V = 50


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, 16), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, V))


def _optimizers(m: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    hidden = {"2.weight", "4.weight"}  # Muon takes 2-D hidden matrices only
    named = dict(m.named_parameters())
    muon = torch.optim.Muon([named[n] for n in sorted(hidden)], lr=0.02)
    adamw = torch.optim.AdamW([p for n, p in named.items() if n not in hidden], lr=3e-3)
    return muon, adamw


def _batches(n: int = 60):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randint(0, V, (32, 4), generator=g)
        yield x, x.sum(1) % V


def _state(opt: torch.optim.Optimizer) -> list[dict]:
    return [copy.deepcopy({k: v for k, v in opt.state[p].items()})
            for g in opt.param_groups for p in g["params"]]


def _same_state(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k]))
                                     for k in x) for x, y in zip(a, b))


def _train(guarded: bool, nan_at: int | None = None, corrupt_at: int | None = None, **kw):
    m = _model()
    muon, adamw = _optimizers(m)
    g = tg.Guard(m, [muon, adamw], console=False, **kw) if guarded else None
    seen: dict[int, tuple] = {}
    for t, (x, y) in enumerate(_batches()):
        if t == corrupt_at:
            with torch.no_grad():
                m[4].weight[0, 0] = float("nan")  # a Muon-trained matrix
        muon.zero_grad()
        adamw.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        if t == nan_at:
            loss = loss * float("nan")
        loss.backward()
        seen[t] = ([p.detach().clone() for p in m.parameters()], _state(muon), _state(adamw))
        if g is not None:
            g.step(loss)
        else:
            muon.step()
            adamw.step()
    return m, g, seen, (muon, adamw)


def test_a_healthy_run_is_the_bare_run_bit_for_bit():
    bare, _, _, _ = _train(False)
    guarded, g, _, _ = _train(True)
    assert all(torch.equal(a, b) for a, b in zip(bare.parameters(), guarded.parameters()))
    assert g.findings == [] and g.actions == []
    assert repr(g.optimizer) == "OptimizerChain([Muon, AdamW])"
    g.close()


@pytest.mark.parametrize("sync", [True, "deferred"])
def test_a_nan_step_skips_both_optimizers(sync):
    m, g, seen, (muon, adamw) = _train(True, nan_at=30, sync=sync)
    assert [(a.kind, a.step) for a in g.actions] == [("skip", 30)]
    # the step after the skipped one starts from the state before it: nothing moved
    w30, mu30, ad30 = seen[30]
    w31, mu31, ad31 = seen[31]
    assert all(torch.equal(a, b) for a, b in zip(w30, w31))
    assert _same_state(mu30, mu31) and _same_state(ad30, ad31)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    g.close()


def test_a_rollback_restores_both_optimizers_exactly():
    m, g, seen, (muon, adamw) = _train(True, corrupt_at=45, snapshot_every=10, nan_at=None)
    assert [a.kind for a in g.actions if a.kind == "rollback"] == ["rollback"]
    rb = next(a for a in g.actions if a.kind == "rollback")
    assert rb.step == 45 and "step 40" in rb.reason
    # right after the rollback (the state step 46 started from) = the state before step 40
    w40, mu40, ad40 = seen[40]
    w46, mu46, ad46 = seen[46]
    assert all(torch.equal(a, b) for a, b in zip(w40, w46))
    assert _same_state(mu40, mu46) and _same_state(ad40, ad46)
    g.close()


def test_schedulers_lr_backoff_and_checkpoints_cover_both(tmp_path):
    m = _model()
    muon, adamw = _optimizers(m)
    s1 = torch.optim.lr_scheduler.StepLR(muon, 10, 0.5)
    s2 = torch.optim.lr_scheduler.StepLR(adamw, 10, 0.5)
    g = tg.Guard(m, [muon, adamw], scheduler=[s1, s2], console=False)
    for t, (x, y) in enumerate(_batches(20)):
        muon.zero_grad()
        adamw.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        (loss * (float("nan") if t == 5 else 1.0)).backward()
        g.step(loss)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5)  # 19 applied steps
    assert adamw.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5)
    g.lr.scale = 0.25
    with g.lr.applied(g.optimizer):
        assert [grp["lr"] for grp in g.optimizer.param_groups] == pytest.approx(
            [0.02 * 0.5 * 0.25, 3e-3 * 0.5 * 0.25])
    g.lr.scale = 1.0
    path = g.save_checkpoint(tmp_path / "c.pt")
    assert path is not None
    m2 = _model()
    muon2, adamw2 = _optimizers(m2)
    tg.load_checkpoint(path, m2, [muon2, adamw2])
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert _same_state(_state(muon), _state(muon2)) and _same_state(_state(adamw), _state(adamw2))
    g.close()


def test_a_step_of_one_chained_optimizer_outside_the_guard_is_warned():
    m = _model()
    muon, adamw = _optimizers(m)
    g = tg.Guard(m, [muon, adamw], console=False)
    for t, (x, y) in enumerate(_batches(3)):
        muon.zero_grad()
        adamw.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        if t == 1:
            adamw.step()  # the user's old line left in
            with pytest.warns(RuntimeWarning, match="twice"):
                g.step(loss)
        else:
            g.step(loss)
    assert g.core.counts["loop_misuse"] == 1
    g.close()


def test_bad_chains_are_refused_clearly():
    m = _model()
    muon, adamw = _optimizers(m)
    with pytest.raises(ValueError, match="two or more"):
        OptimizerChain([adamw])
    with pytest.raises(ValueError, match="listed twice"):
        OptimizerChain([adamw, adamw])
    with pytest.raises(ValueError, match="held by both"):
        OptimizerChain([adamw, torch.optim.SGD(m[0].parameters(), lr=0.1)])
    with pytest.raises(ValueError, match="requires a closure"):
        OptimizerChain([adamw, torch.optim.LBFGS(m[2].parameters())])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        tg.Guard(m, [muon, "adamw"])
    chain = OptimizerChain([muon, adamw])
    with pytest.raises(TypeError, match="optimizers\\[i\\].add_param_group"):
        chain.add_param_group({"params": []})
    with pytest.raises(ValueError, match="2 optimizers"):
        chain.load_state_dict(adamw.state_dict())
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        tg.Guard(m, [muon, adamw], scheduler=torch.optim.lr_scheduler.StepLR(other, 5),
                 console=False)
