"""Checkpoints that are never poisoned: guard.healthy, guard.last_good_step, checkpoint_dir,
the rollback that reaches back to disk, loading with weights_only."""
import math
import os
import pickle

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.types import Finding


def _setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    kw.setdefault("console", False)
    kw.setdefault("locate", False)
    guard = tg.Guard(model, opt, **kw)
    X, y = torch.randn(64, 4), torch.randn(64, 1)
    return model, opt, guard, X, y


def _step(model, opt, guard, X, y, poison=False):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(X), y)
    loss.backward()
    if poison:
        model[0].weight.grad[0, 0] = math.nan  # an update that writes NaN, not repaired below
    return guard.step(loss)


def _finite(sd):
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@pytest.mark.parametrize("check", [False, True])
def test_a_nan_run_does_not_overwrite_the_good_checkpoint(tmp_path, check):
    """The user's own save code, every 5 steps to one file; from step 12 the run keeps stepping
    on NaN (a monitor-only policy repairs nothing). Without the check the good file is
    overwritten with NaN weights; with ``guard.healthy`` it is kept."""
    model, opt, guard, X, y = _setup(policy=tg.Policy.monitor_only())
    path = tmp_path / "last.pt"
    saved_at = []
    for step in range(30):
        _step(model, opt, guard, X, y, poison=step == 12)
        if (step + 1) % 5 == 0 and (guard.healthy or not check):
            torch.save(model.state_dict(), path)
            saved_at.append(step + 1)
    sd = torch.load(path, weights_only=True)
    if not check:
        assert not _finite(sd)  # the control: what happens without the check
        return
    assert _finite(sd) and saved_at == [5, 10]
    assert not guard.healthy
    assert 10 <= guard.last_good_step <= 12
    guard.close()


def test_checkpoint_dir_writes_only_healthy_state_and_keeps_the_newest(tmp_path):
    model, opt, guard, X, y = _setup(policy=tg.Policy.monitor_only(), checkpoint_dir=tmp_path / "ck",
                                     checkpoint_every=5, checkpoints=2)
    for step in range(30):
        _step(model, opt, guard, X, y, poison=step == 17)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == ["trainguard-step000000010.pt", "trainguard-step000000015.pt"], names
    deferred = guard.core.counts["checkpoint_deferred"]
    assert deferred >= 1  # steps 20, 25, 30 deferred (reported once per step)
    # a resumed run loads the newest good one, Guard state included
    model2, opt2, guard2, _, _ = _setup(seed=1)
    info = tg.load_checkpoint(tmp_path / "ck" / names[-1], model2, opt2, guard=guard2)
    assert info["step"] == 15 and guard2.step_count == 15
    assert _finite(model2.state_dict())
    assert opt2.state_dict()["state"][0]["step"].item() == 15
    guard.close()
    guard2.close()


def test_load_checkpoint_refuses_what_it_must_not_load(tmp_path):
    model, opt, guard, X, y = _setup()
    for _ in range(3):
        _step(model, opt, guard, X, y)
    p = guard.save_checkpoint(tmp_path / "a.pt")
    assert p is not None
    before = [t.clone() for t in model.state_dict().values()]
    # a pickle that would run code: refused by weights_only, nothing changed
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"format": "trainguard-checkpoint", "x": os.system}, fh)
    with pytest.raises(ValueError, match="not a readable trainguard checkpoint"):
        tg.load_checkpoint(evil, model)
    # a trainguard checkpoint holding NaN: refused before anything is loaded
    d = torch.load(p, weights_only=True)
    d["model"]["0.weight"][0, 0] = math.nan
    bad = tmp_path / "bad.pt"
    torch.save(d, bad)
    with pytest.raises(ValueError, match="non-finite"):
        tg.load_checkpoint(bad, model)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a trainguard checkpoint"):
        tg.load_checkpoint(tmp_path / "other.pt", model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "bad.pt", "evil.pt", "other.pt"]  # no temp left
    guard.close()


class _DamageSeen:
    """A detector that reports, at one step, damage that began before every in-memory snapshot
    (as the dead-units detector does with ``evidence["healthy_step"]``)."""

    def __init__(self, at, healthy):
        self.at, self.healthy = at, healthy

    def update(self, s):
        if s.step == self.at:
            return [Finding(kind="dead_units", step=s.step, message="units died", severity="critical",
                            evidence={"healthy_step": self.healthy})]
        return []

    def reset(self): ...

    def state_dict(self):
        return {}

    def load_state_dict(self, st): ...


def test_rollback_beyond_the_snapshots_starts_from_the_checkpoint(tmp_path):
    from trainguard.detect import default_detectors
    model, opt, guard, X, y = _setup(checkpoint_dir=tmp_path, checkpoint_every=4, checkpoints=8, snapshot_every=10,
                                     snapshots=1, detectors=default_detectors() + [_DamageSeen(23, 6)],
                                     policy=tg.Policy({"dead_units": ("rollback",)}))
    at_4 = None
    for step in range(24):
        _step(model, opt, guard, X, y)
        if step == 3:
            at_4 = [t.clone() for t in model.state_dict().values()]
    rb = [a for a in guard.actions if a.kind == "rollback"]
    assert len(rb) == 1 and rb[0].detail["to_step"] == 4, guard.actions
    assert "checkpoint of step 4" in rb[0].reason
    assert all(torch.equal(a, b) for a, b in zip(at_4, model.state_dict().values()))
    guard.close()


def test_healthy_waits_for_an_unanswered_severe_finding_to_settle():
    from trainguard.core import QUIET
    model, opt, guard, X, y = _setup(policy=tg.Policy.monitor_only(), param_norm_every=1)
    for _ in range(5):
        _step(model, opt, guard, X, y)
    assert guard.healthy and guard.last_good_step == 5
    guard.core.unresolved = guard.step_count - 1  # as if a spike went unanswered at the last step
    guard._health = None
    assert not guard.healthy
    for _ in range(QUIET + 1):
        _step(model, opt, guard, X, y)
    assert guard.healthy and guard.last_good_step == guard.step_count
    guard.close()


def test_checkpoint_options_are_checked(tmp_path):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        tg.Guard(model, opt, checkpoint_every=5, console=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="must be a directory"):
        tg.Guard(model, opt, checkpoint_dir=f, console=False)
    g = tg.Guard(model, opt, console=False)
    with pytest.raises(ValueError, match="needs a path"):
        g.save_checkpoint()
    g.close()
