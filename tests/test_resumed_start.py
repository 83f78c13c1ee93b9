"""A run that starts from a trained model with a fresh Guard (a resume after a code change, more
epochs on a trained classifier): its first losses sit near the floor, and the rules that measure
progress from the start must not take their noise for progress lost (before: 18 of 24 resumed
runs had false divergences, and this file's resumed digits classifier had false findings)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.detect import DivergenceDetector, PlateauDetector
from trainguard.detect.progress import NOISE_MARGIN, start_noise
from trainguard.stats import chance_level, plain_cross_entropy
from trainguard.types import StepStats


def feed(det, values, chance=None):
    if chance is not None:
        det.set_chance(chance)
    return [f for i, v in enumerate(values)
            for f in det.update(StepStats(step=i, loss=float(v), grad_norm=1.0))]


def heavy_tailed(n, level, seed):
    """A converged classifier's batch losses: log-normal with a log-noise of 1."""
    return list(level * np.exp(np.random.RandomState(seed).randn(n)))


# ----------------------------------------------------------------------------- the start's noise
def test_start_noise_measures_the_batch_noise_not_a_descent_or_one_jump():
    r = np.random.RandomState(0)
    descent = list(2.3 * np.exp(-0.1 * np.arange(20) + 0.02 * r.randn(20)))
    assert start_noise(descent) < 0.05
    noisy = heavy_tailed(20, 0.005, 1)
    assert 0.5 < start_noise(noisy) < 2.0
    jump = [1.0] * 10 + [30.0] * 10  # a ruin that begins among the first losses
    assert start_noise(jump) == 0.0
    assert start_noise([1.0, 2.0, 3.0, 4.0]) is None  # too few to tell


def test_chance_level_of_a_trained_cross_entropy_start():
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    assert chance_level(m, 2.4) == pytest.approx(math.log(10))  # untrained, as before
    assert chance_level(m, 0.01, kind="plain_cross_entropy") == pytest.approx(math.log(10))
    assert chance_level(m, 2.4, kind="plain_cross_entropy") == pytest.approx(math.log(10))
    assert chance_level(m, 0.01) is None  # the graph did not say it is a cross-entropy
    # a weighted or summed cross-entropy says nothing about its level (1e-9 x CE: zoo Z10)
    assert chance_level(m, 0.01, kind="cross_entropy") is None
    assert chance_level(m, 0.01, kind="other") is None
    assert chance_level(m, 5.0, kind="plain_cross_entropy") is None  # above the guess
    x, y = torch.randn(4, 10, requires_grad=True), torch.tensor([1, 2, 3, 4])
    assert plain_cross_entropy(nn.functional.cross_entropy(x, y))
    assert not plain_cross_entropy(1e-9 * nn.functional.cross_entropy(x, y))
    assert not plain_cross_entropy(nn.functional.cross_entropy(x, y, label_smoothing=0.1))


# ----------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("seed", range(5))
def test_a_converged_start_noise_is_not_progress_given_back(seed):
    vals = heavy_tailed(1500, 0.005, seed)
    assert feed(DivergenceDetector(), vals) == []
    assert [f for f in feed(PlateauDetector(), vals) if f.evidence.get("cause")] == []


def test_an_untrained_start_still_gives_back_its_progress():
    r = np.random.RandomState(0)
    descent = list(2.3 * np.exp(-0.05 * np.arange(100)) * np.exp(0.05 * r.randn(100)))
    ruined = [2.0 + 0.05 * r.randn() for _ in range(30)]
    f = feed(DivergenceDetector(), descent + ruined)
    assert f and f[0].evidence["trigger"] == "giveback"
    # the same ruin from a resumed start at 0.015 whose noise is as large as the move: silent;
    # from a quiet resumed start (noise 0.02), the move is beyond the noise and reported
    quiet = list(0.2 * np.exp(0.02 * r.randn(100)))
    assert start_noise(quiet[:20]) * NOISE_MARGIN < math.log(0.2 / 0.05)
    f = feed(DivergenceDetector(fast_window=1), quiet + [0.05] * 100 + [0.19] * 30)
    assert f and f[0].evidence["trigger"] == "giveback"


def test_a_plateau_below_half_of_chance_is_not_stuck():
    # the first loss at the level (one drawn high, 6x it, sets a bar that the mean over the
    # stall, PlateauDetector._level_stalled, stays under: no note at all)
    vals = [0.005] + heavy_tailed(399, 0.005, 3)
    plain = feed(PlateauDetector(), vals)
    assert feed(PlateauDetector(), vals, chance=math.log(10)) == []
    assert plain  # without the chance level the flat start reads as a stall (info)
    assert all(f.severity == "info" for f in plain)


# ----------------------------------------------------------------------------- a real resume
@pytest.mark.parametrize("fresh_optimizer", [False, True])
def test_a_trained_digits_classifier_resumed_with_a_fresh_guard_is_left_alone(fresh_optimizer):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data / 16, dtype=torch.float32)
    Y = torch.tensor(d.target)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    o = torch.optim.Adam(m.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1500):
        i = torch.randint(0, len(X), (32,), generator=gen)
        o.zero_grad()
        nn.functional.cross_entropy(m(X[i]), Y[i]).backward()
        o.step()
    m2 = copy.deepcopy(m)
    o2 = torch.optim.Adam(m2.parameters(), lr=3e-3)
    if not fresh_optimizer:
        o2.load_state_dict(o.state_dict())
    g = tg.Guard(m2, o2, console=False)
    gen = torch.Generator().manual_seed(100)
    for _ in range(700):
        i = torch.randint(0, len(X), (32,), generator=gen)
        loss = nn.functional.cross_entropy(m2(X[i]), Y[i])
        o2.zero_grad()
        loss.backward()
        g.step(loss)
    assert g.chance_loss == pytest.approx(math.log(10))
    assert not [f for f in g.findings if f.kind in ("divergence", "plateau", "loss_spike")]
    assert not [a for a in g.actions if a.kind in ("rollback", "lr_backoff", "skip", "halt")]
    g.close()
