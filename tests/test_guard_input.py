"""Bad input gets a clear error before anything is applied (issue #12, item 7)."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

import trainguard as tg


def _setup():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def test_a_scheduler_that_is_not_one_is_refused_at_construction():
    m, o = _setup()
    with pytest.raises(TypeError, match="scheduler must be a torch LR scheduler"):
        tg.Guard(m, o, scheduler=0.5, console=False)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        tg.Guard(m, o, scheduler=torch.optim.lr_scheduler.StepLR(other, 10), console=False)
    tg.Guard(m, o, scheduler=torch.optim.lr_scheduler.StepLR(o, 10), console=False).close()


def test_locate_dir_that_is_a_file_is_refused(tmp_path):
    m, o = _setup()
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="locate_dir must be a directory"):
        tg.Guard(m, o, locate_dir=str(f), console=False)


def test_malformed_state_dict_changes_nothing():
    m, o = _setup()
    g = tg.Guard(m, o, console=False)
    for _ in range(30):
        x = torch.randn(8, 4)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
        loss.backward()
        g.step(loss)
    before = copy.deepcopy(g.state_dict())
    bad = copy.deepcopy(before)
    bad["step_count"] = 999
    bad["lr"] = {"scale": 0.5}  # missing keys: failed half-way before the fix
    with pytest.raises(ValueError, match="malformed Guard state"):
        g.load_state_dict(bad)
    assert g.state_dict() == before
    bad2 = copy.deepcopy(before)
    del bad2["policy"]
    with pytest.raises(ValueError, match="missing"):
        g.load_state_dict(bad2)
    assert g.state_dict() == before


def test_replay_with_a_nonsense_device_is_a_clear_error(capsys):
    from trainguard.locate import run
    rc = run(argparse.Namespace(bundle="/nonexistent", factory=None, device="nonsense"))
    assert rc == 2
    assert "is not a torch device" in capsys.readouterr().err


def _hooks(m, o):
    return (sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules()),
            len(o._optimizer_step_post_hooks))


def test_a_new_guard_replaces_the_live_one_and_a_collected_guard_leaves_no_hooks():
    """Creating a Guard per epoch without close() piled hooks up on the model (issue #12
    item 7): each epoch's forward ran every old Guard's capture."""
    import gc
    m, o = _setup()
    bare = _hooks(m, o)
    g1 = tg.Guard(m, o, console=False)
    one = _hooks(m, o)
    for _ in range(3):
        with pytest.warns(RuntimeWarning, match="new Guard"):
            g = tg.Guard(m, o, console=False)
        assert _hooks(m, o) == one
    assert g1._closed
    g.close()
    assert _hooks(m, o) == bare
    g3 = tg.Guard(m, o, console=False)
    x = torch.randn(8, 4)
    o.zero_grad()
    loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
    loss.backward()
    g3.step(loss)
    del g3
    gc.collect()
    assert _hooks(m, o) == bare


def test_locate_explains_a_models_shape_error():
    """tg.locate passed the model's raw shape error through (issue #12 item 7)."""
    m, _ = _setup()
    with pytest.raises(ValueError, match="could not run the model and loss on this batch.*shapes"):
        tg.locate(m, nn.functional.cross_entropy, (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)))
