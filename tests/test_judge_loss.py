"""Losses that are not meant to go down: a GAN's players (coupled losses, found when two guarded
runs take turns), a policy-gradient surrogate or an entropy bonus (``judge_loss=False``), and
losses that are not all positive (the loss-spike rule's raw-value branch)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.core import COUPLED_TURNS, DecisionCore
from trainguard.detect import (LOSS_DETECTORS, DivergenceDetector, LossSpikeDetector,
                               NonFiniteDetector, PlateauDetector, default_detectors)
from trainguard.sinks.base import Sink
from trainguard.types import StepStats


class Events(Sink):
    def __init__(self) -> None:
        self.events: list[tuple[str, int, dict]] = []

    def on_event(self, kind: str, step: int, data: dict) -> None:
        self.events.append((kind, step, data))


def turn(core: DecisionCore) -> None:
    """One step of a front-end, as far as turn-taking goes."""
    core.take_turn()
    core.step_count += 1


# ----------------------------------------------------------------------------- the core
def test_two_cores_taking_turns_couple_and_their_progress_rules_go_off():
    ev = Events()
    d, g = DecisionCore(sinks=[ev]), DecisionCore()
    for _ in range(COUPLED_TURNS):
        turn(d)
        turn(g)
    assert not d.coupled and not g.coupled  # each one's first step is not a turn
    turn(d)
    turn(g)
    assert d.coupled and g.coupled
    assert not any(isinstance(x, PlateauDetector) for x in d.detectors)
    div = next(x for x in d.detectors if isinstance(x, DivergenceDetector))
    assert div.progress is False
    assert any(isinstance(x, LossSpikeDetector) for x in d.detectors)
    assert [k for k, _, _ in ev.events] == ["coupled_losses"]
    assert "judge_loss=True" in ev.events[0][2]["message"]


def test_a_wgan_critic_with_five_steps_per_generator_step_couples():
    critic, gen = DecisionCore(), DecisionCore()
    for _ in range(5):
        for _ in range(5):
            turn(critic)
        turn(gen)
    assert critic.coupled and gen.coupled


@pytest.mark.parametrize("block", [20, 50])
def test_runs_one_after_the_other_or_in_blocks_do_not_couple(block):
    a, b = DecisionCore(), DecisionCore()
    for _ in range(300):
        turn(a)
    for _ in range(300):
        turn(b)
    assert not a.coupled and not b.coupled
    a, b = DecisionCore(), DecisionCore()  # a benchmark's interleaved blocks
    for _ in range(20):
        for c in (a, b):
            for _ in range(block):
                turn(c)
    assert not a.coupled and not b.coupled


def test_judge_loss_true_never_couples_and_false_drops_the_loss_detectors():
    a, b = DecisionCore(judge_loss=True), DecisionCore(judge_loss=True)
    for _ in range(10):
        turn(a)
        turn(b)
    assert not a.coupled and any(isinstance(x, PlateauDetector) for x in a.detectors)
    off = DecisionCore(judge_loss=False)
    assert off.detectors and not any(isinstance(x, LOSS_DETECTORS) for x in off.detectors)
    assert any(isinstance(x, NonFiniteDetector) for x in off.detectors)
    # an explicit list is filtered too
    mine = DecisionCore(detectors=[LossSpikeDetector(), NonFiniteDetector()], judge_loss=False)
    assert [type(x) for x in mine.detectors] == [NonFiniteDetector]
    assert len(default_detectors(judge_loss=False)) == len(default_detectors()) - 3
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match="judge_loss must be True, False or 'auto'"):
            DecisionCore(judge_loss=bad)


def test_coupling_survives_a_state_dict_round_trip():
    a, b = DecisionCore(), DecisionCore()
    for _ in range(COUPLED_TURNS + 1):
        turn(a)
        turn(b)
    assert a.coupled
    fresh = DecisionCore()
    fresh.load_state_dict(a.state_dict())
    assert fresh.coupled and not any(isinstance(x, PlateauDetector) for x in fresh.detectors)


def test_the_progress_rules_off_leave_the_fast_blow_up_rule():
    div = DivergenceDetector()
    div.progress = False
    out = []
    for i, v in enumerate([1.0] * 60 + [5.0] * 30 + [10.0, 1e2, 1e3, 1e4, 1e5]):
        out += div.update(StepStats(step=i, loss=v, grad_norm=1.0))
    assert [f.evidence["trigger"] for f in out] == ["fast"]  # no slow or ruin finding


# ----------------------------------------------------------------------------- loss spikes
def _stream(values):
    det = LossSpikeDetector()
    return [f for i, v in enumerate(values)
            for f in det.update(StepStats(step=i, loss=float(v), grad_norm=1.0))]


def test_a_negative_loss_judged_on_raw_values_needs_a_jump_at_the_task_scale():
    # an entropy bonus: from ~0 down to -1.05, then batch noise of ~0.01 with jumps of 0.09
    r = np.random.RandomState(0)
    start = list(np.linspace(0.0, -1.0, 100) + 0.01 * r.randn(100))
    calm = list(-1.05 + 0.01 * r.randn(200))
    small = start + calm[:100] + [-0.96] + calm[100:]
    assert not _stream(small)
    big = start + calm[:100] + [1.5] + calm[100:]  # a batch of wrong labels: nats, not 0.1
    f = _stream(big)
    assert [x.step for x in f] == [200]
    assert "raw values" in f[0].message and f[0].evidence["raw"] is True


# ----------------------------------------------------------------------------- a real GAN
def _gan(steps, nan_at=None, width=32, batch=32, **kw):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, 2))
    D = nn.Sequential(nn.Linear(2, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                      nn.LeakyReLU(0.2), nn.Linear(width, 1))
    oG = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    oD = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    gG = tg.Guard(G, oG, console=False, **kw.get("g", {}))
    gD = tg.Guard(D, oD, console=False, **kw.get("d", {}))
    centers = torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)]
                            for k in range(8)]) * 2
    bce = nn.BCEWithLogitsLoss()
    for i in range(steps):
        real = centers[torch.randint(0, 8, (batch,))] + 0.05 * torch.randn(batch, 2)
        if i == nan_at:
            real[3, 0] = math.nan
        fake = G(torch.randn(batch, 4))
        loss_d = (bce(D(real), torch.ones(batch, 1))
                  + bce(D(fake.detach()), torch.zeros(batch, 1)))
        oD.zero_grad()
        loss_d.backward()
        gD.step(loss_d)
        loss_g = bce(D(fake), torch.ones(batch, 1))
        oG.zero_grad()
        loss_g.backward()
        gG.step(loss_g)
    return gG, gD, D


def test_a_gan_guarded_on_both_players_is_left_alone(tmp_path):
    log = tmp_path / "g.jsonl"
    gG, gD, _ = _gan(250, width=64, batch=64, g={"log": str(log)})
    gG.close()
    gD.close()
    assert gG.core.coupled and gD.core.coupled
    assert not gG.findings and not gD.findings and not gG.actions and not gD.actions
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(e.get("type") == "coupled_losses" for e in events)


def test_the_generators_rising_loss_is_what_the_coupling_spares():
    # judged as a loss that should go down, the generator's rise (D learning) is taken for an
    # LR that is too high: rolled back with its LR cut, and the advice names judge_loss
    gG, gD, _ = _gan(250, width=64, batch=64, g={"judge_loss": True})
    assert not gG.core.coupled and gD.core.coupled
    assert gG.actions and "rollback" in {a.kind for a in gG.actions}
    f = gG.findings[0]
    assert any("judge_loss=False" in r for r in f.remedies)
    gG.close()
    gD.close()


def test_a_nan_batch_in_a_coupled_gan_is_still_skipped():
    gG, gD, D = _gan(200, nan_at=150)
    assert gD.core.coupled
    kinds = [(f.step, f.kind) for f in gD.findings]
    assert kinds == [(150, "nonfinite")]
    assert [(a.step, a.kind) for a in gD.actions] == [(150, "skip")]
    assert all(torch.isfinite(p).all() for p in D.parameters())
    gG.close()
    gD.close()


def test_judge_loss_false_still_catches_a_nan_loss():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    o = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = tg.Guard(m, o, console=False, judge_loss=False)
    assert not any(isinstance(x, LOSS_DETECTORS) for x in g.detectors)
    x = torch.randn(64, 8)
    for i in range(30):
        logits = m(x)
        dist = torch.distributions.Categorical(logits=logits)
        a = dist.sample()
        adv = torch.randn(64) if i != 20 else torch.full((64,), math.nan)
        loss = -(dist.log_prob(a) * adv).mean() - 0.01 * dist.entropy().mean()
        o.zero_grad()
        loss.backward()
        g.step(loss)
    assert [(f.step, f.kind) for f in g.findings] == [(20, "nonfinite")]
    g.close()


def test_two_monitors_taking_turns_couple():
    rng = np.random.default_rng(0)
    w1, w2 = {"w": rng.normal(size=4)}, {"w": rng.normal(size=4)}
    m1, m2 = tg.Monitor(w1), tg.Monitor(w2)
    for _ in range(COUPLED_TURNS + 1):
        for m, w in ((m1, w1), (m2, w2)):
            d = m.step(float(np.sum(w["w"] ** 2)), {"w": 2 * w["w"]}, lr=0.1)
            if d.apply:
                w["w"] -= 0.1 * 2 * w["w"]
    assert m1.core.coupled and m2.core.coupled
