"""A loss whose definition changes mid-run (a loss term switched on, a new task or stage) is not
a failure: ``guard.loss_changed()`` says so, and without it a jump that persists at weights a
rollback restored is found to be such a change (``trainguard.core.SHIFT_STEPS``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import trainguard as tg
from trainguard.core import DecisionCore
from trainguard.detect import LossSpikeDetector
from trainguard.remedies.clip import AdaptiveClip
from trainguard.types import Finding, StepStats


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
        self.dec = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64))

    def forward(self, x):
        mu, lv = self.enc(x).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * lv).exp()
        return self.dec(z), mu, lv


def vae_run(steps=420, switch=300, tell=False, corrupt=None, seed=0, **kw):
    """A VAE on the digits whose KL term is off before ``switch`` and on from it (KL warm-up
    by a step, as some recipes do); ``corrupt``: instead, the decoder's last weights are
    multiplied by 30 at that step (weights that went bad)."""
    X = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    torch.manual_seed(seed)
    m = VAE()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    guard = tg.Guard(m, opt, console=False, **kw)
    for step in range(steps):
        if step == switch and tell:
            guard.loss_changed("KL term on")
        if step == switch and corrupt:
            with torch.no_grad():
                m.dec[2].weight.mul_(corrupt)
        x = X[torch.randint(0, len(X), (64,))]
        opt.zero_grad()
        r, mu, lv = m(x)
        rec = nn.functional.binary_cross_entropy_with_logits(r, x, reduction="sum") / len(x)
        kl = (-0.5 * (1 + lv - mu ** 2 - lv.exp()).sum(-1)).mean()
        beta = 1.0 if step >= switch and not corrupt else 0.0
        loss = rec + beta * kl
        loss.backward()
        guard.step(loss)
    guard.close()
    return guard


def test_a_kl_term_switched_on_is_found_to_be_a_change_of_the_loss(tmp_path):
    log = tmp_path / "run.jsonl"
    g = vae_run(log=str(log))
    assert g.counts["loss_changed"] == 1
    assert g.lr_scale == 1.0  # the cut made with the rollback is undone
    assert g.action_counts["rollback"] == 1
    assert not [f for f in g.findings if f.step > 310]  # the rules restarted at the new level
    events = [json.loads(line) for line in log.read_text().splitlines()]
    ev = [e for e in events if e.get("type") == "loss_changed"]
    assert len(ev) == 1 and ev[0]["by"] == "guard"
    assert "the data or the loss function changed" in ev[0]["message"]


def test_a_change_of_the_loss_told_in_advance_is_silent():
    g = vae_run(tell=True)
    assert g.counts["loss_changed"] == 1
    assert not g.findings and not g.actions


def test_weights_that_went_bad_are_not_taken_for_a_change_of_the_loss():
    g = vae_run(corrupt=30.0)
    assert g.action_counts["rollback"] >= 1
    assert g.counts["loss_changed"] == 0  # the restored weights gave a calm loss again
    assert g.lr_scale < 1.0


def test_loss_spike_quotes_the_last_calm_step():
    d = LossSpikeDetector()
    rng = np.random.default_rng(0)
    out = []
    for t in range(60):
        loss = 1.0 + 0.05 * rng.standard_normal() if t < 50 else 40.0
        out += d.update(StepStats(step=t, loss=loss, grad_norm=1.0))
    assert out and all(f.evidence["healthy_step"] == 49 for f in out)
    assert d.state_dict()["calm_step"] == 49


def test_policy_forget_starts_the_ladder_again():
    p = tg.Policy()
    f = Finding(kind="loss_spike", step=0, severity="warning", message="")
    assert [p.decide([f], t).kinds() for t in range(3)] == [{"skip"}, {"skip"},
                                                               {"rollback", "lr_backoff"}]
    p.forget({"loss_spike"})
    assert p.decide([f], 3).kinds() == {"skip"}


def test_core_loss_changed_restarts_the_loss_rules_and_asks_the_chance_again():
    core = DecisionCore(chance_loss="auto")
    for t in range(30):
        core.detect(StepStats(step=t, loss=2.0 - 0.01 * t, grad_norm=1.0),
                    infer_chance=lambda _: 2.3)
    assert core.chance_loss == 2.3
    told = []
    core.on_loss_changed.append(lambda: told.append(1))
    core.loss_changed("new task")
    assert core.chance_loss is None and core.chance_option == "auto" and told == [1]
    spike = next(d for d in core.detectors if isinstance(d, LossSpikeDetector))
    assert not spike.history and spike.initial is None
    assert core.counts["loss_changed"] == 1
    fixed = DecisionCore(chance_loss=1.5)
    fixed.loss_changed()
    assert fixed.chance_loss == 1.5
    assert all(getattr(d, "chance", 1.5) == 1.5 for d in fixed.detectors)


def test_loss_changed_refuses_a_reason_that_is_not_text():
    m = nn.Linear(2, 1)
    g = tg.Guard(m, torch.optim.SGD(m.parameters(), 0.1), console=False)
    with pytest.raises(TypeError, match="reason must be a string"):
        g.loss_changed(3)  # type: ignore[arg-type]


def test_adaptive_clip_rebase_lets_the_next_norm_through():
    c = AdaptiveClip()
    for _ in range(40):
        c.coefficient(1.0 + 0.01 * (_ % 3))
    assert c.coefficient(50.0) < 1.0  # a sudden jump
    c.rebase()
    assert c.coefficient(50.0) == 1.0  # a new level, not a jump


def regression_targets_scaled(scale_at=150, steps=260, scale=10.0):
    """Mini-batch linear regression under the NumPy Monitor whose targets are scaled by
    ``scale`` from ``scale_at`` on (a new dataset's units)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    y = X @ np.array([[1.5], [-2.0], [0.5]]) + 0.1 * rng.normal(size=(400, 1))
    w = np.zeros((3, 1))
    mon = tg.Monitor(params={"w": w}, snapshot_every=50)
    for t in range(steps):
        idx = rng.choice(len(X), 32, replace=False)
        yb = y[idx] * (scale if t >= scale_at else 1.0)
        r = X[idx] @ w - yb
        d = mon.step(float(np.mean(r ** 2)), {"w": 2.0 / 32 * X[idx].T @ r}, lr=0.05)
        if d.apply:
            w -= 0.05 * d.lr_scale * d.clip_scale * (2.0 / 32 * X[idx].T @ r)
    return mon


def test_the_numpy_monitor_finds_a_change_of_the_loss_too():
    mon = regression_targets_scaled()
    assert mon.counts["loss_changed"] == 1
    assert mon.lr_scale == 1.0


def test_a_blow_up_quotes_the_step_it_started_from():
    from trainguard.detect import DivergenceDetector
    d = DivergenceDetector()
    out = []
    for t in range(70):
        loss = 2.0 - 0.01 * t if t < 60 else 1e3 * 10 ** (t - 60)
        out += d.update(StepStats(step=t, loss=loss, grad_norm=1.0))
    fast = [f for f in out if f.evidence.get("trigger") == "fast"]
    assert fast and fast[0].evidence["healthy_step"] == 59  # the low point, 1.41
    # a state saved before the steps were kept still loads and judges
    state = d.state_dict()
    state.pop("window_steps")
    e = DivergenceDetector()
    e.load_state_dict(state)
    assert isinstance(e.update(StepStats(step=70, loss=1e9, grad_norm=1.0)), list)
