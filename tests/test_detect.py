"""Detector rules on synthetic StepStats streams (no torch, milliseconds): every threshold is
exercised on both sides."""
from __future__ import annotations

import math

import numpy as np
import pytest

from trainguard.detect import (DeadUnitsDetector, DivergenceDetector, GradExplosionDetector,
                               LossSpikeDetector, PlateauDetector, SaturationDetector,
                               VanishingGradientDetector, ZeroGradientDetector)
from trainguard.types import StepStats


def st(step, loss=1.0, grad=1.0, grads=None, acts=None):
    grads = grads if grads is not None else [grad, grad]
    return StepStats(step=step, loss=loss, grad_norm=grad, modules=[f"m{i}" for i in range(len(grads))],
                     grad_norms=grads, activations=acts)


def feed(det, stream):
    out = []
    for s in stream:
        out += det.update(s)
    return out


def noisy(n, center=1.0, spread=0.05, seed=0):
    r = np.random.RandomState(seed)
    return list(center * np.exp(spread * r.randn(n)))


# ----------------------------------------------------------------------------- loss spikes
def test_loss_spike_sudden_jump_fires():
    vals = noisy(40) + [5.0]
    f = feed(LossSpikeDetector(), [st(i, loss=v) for i, v in enumerate(vals)])
    assert [x.step for x in f] == [40]


def test_loss_spike_gradual_rise_below_jump_is_silent():
    # edge-of-stability shape: each step < 2.5x the previous one, total 4x
    vals = noisy(40, spread=0.01) + [1.5, 2.6, 4.0]
    assert feed(LossSpikeDetector(), [st(i, loss=v) for i, v in enumerate(vals)]) == []
    # the same rise with a smaller jump factor is reported
    assert feed(LossSpikeDetector(jump=1.5), [st(i, loss=v) for i, v in enumerate(vals)])


def test_loss_spike_gradual_rise_past_ten_times_median_fires():
    # stale-second-moment shape: ~2x per step up to 16x the median
    vals = [1.0] * 20 + noisy(70, center=0.01, spread=0.01) + [0.02, 0.04, 0.08, 0.16]
    f = feed(LossSpikeDetector(), [st(i, loss=v) for i, v in enumerate(vals)])
    assert [x.step for x in f] == [93]
    assert feed(LossSpikeDetector(gradual=20.0), [st(i, loss=v) for i, v in enumerate(vals)]) == []


def test_loss_spike_ratio_and_floor():
    base = noisy(40, spread=0.01)
    # 1.8x the median: above z but below ratio 2
    assert feed(LossSpikeDetector(jump=1.1), [st(i, loss=v) for i, v in enumerate(base + [1.8])]) == []
    # tiny absolute jump relative to the initial loss scale (floor 0.1 * L0)
    small = [1.0] * 20 + list(0.001 * np.exp(0.01 * np.random.RandomState(1).randn(70))) + [0.05]
    assert feed(LossSpikeDetector(), [st(i, loss=v) for i, v in enumerate(small)]) == []
    big = small[:-1] + [0.5]
    assert feed(LossSpikeDetector(), [st(i, loss=v) for i, v in enumerate(big)])


def test_loss_spike_needs_history():
    vals = [1.0] * 10 + [100.0]
    assert feed(LossSpikeDetector(), [st(i, loss=v) for i, v in enumerate(vals)]) == []


# ----------------------------------------------------------------------------- gradient explosion
def test_grad_explosion_sudden_fires_gradual_silent():
    base = noisy(40)
    f = feed(GradExplosionDetector(), [st(i, grad=v) for i, v in enumerate(base + [50.0])])
    assert len(f) == 1 and f[0].kind == "grad_explosion"
    # 2.2x per step (the measured edge-of-stability onset) never passes jump = 3
    ramp = base + [2.2 ** k for k in range(1, 7)]
    assert feed(GradExplosionDetector(), [st(i, grad=v) for i, v in enumerate(ramp)]) == []
    assert feed(GradExplosionDetector(jump=2.0), [st(i, grad=v) for i, v in enumerate(ramp)])


def test_grad_explosion_ratio_threshold():
    base = noisy(40, spread=0.01)
    assert feed(GradExplosionDetector(), [st(i, grad=v) for i, v in enumerate(base + [8.0])]) == []
    assert feed(GradExplosionDetector(), [st(i, grad=v) for i, v in enumerate(base + [12.0])])


def test_grad_explosion_below_initial_scale_is_silent():
    # a memorised run's tiny gradients waking up: 30x the recent median but below the start
    vals = [10.0] * 20 + noisy(40, center=0.01, spread=0.01) + [0.3]
    assert feed(GradExplosionDetector(), [st(i, grad=v) for i, v in enumerate(vals)]) == []


# ----------------------------------------------------------------------------- divergence
def test_divergence_fast_blowup_fires():
    vals = [1.0, 0.9, 0.8, 5.0, 200.0, 9000.0, 1e5]
    f = feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(vals)])
    assert f and f[0].evidence["trigger"] == "fast"


def test_divergence_fast_rule_needs_loss_above_first_loss():
    # small-batch noise near convergence: 1e4x in four rises but still below the first loss
    vals = [2.3] + [0.01] * 60 + [1e-4, 1e-3, 0.01, 0.1, 1.38]
    assert feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(vals)]) == []
    vals2 = vals[:-1] + [3.0]
    assert feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(vals2)])


def test_divergence_fast_factor_threshold():
    vals = [1.0, 2.0, 4.0, 8.0, 16.0]  # 16x in four steps: far below 1e4
    assert feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(vals)]) == []


def test_divergence_slow_rule():
    down = list(np.linspace(2.0, 0.1, 100))
    up = [1.8] * 30
    # ruin=False isolates the slow rule (the giveback rule fires first, see
    # tests/test_detect_ruin.py)
    f = feed(DivergenceDetector(ruin=False), [st(i, loss=v) for i, v in enumerate(down + up)])
    assert f and f[0].evidence["trigger"] == "slow"
    mild = [0.3] * 30  # 3x the best, below factor 4
    assert feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(down + mild)]) == []


def test_divergence_windowed_fast_rule_catches_a_non_monotone_runaway():
    # the zoo's exploding RNN after a rollback (seed 0): 1.9e4x over nine steps, with a dip,
    # never 1e4x within four consecutive rises; the old rules missed it until the run was lost
    vals = [1.49, 0.785, 1.259, 1.051, 0.269, 0.195, 0.578, 0.522, 4.47, 15.06, 27.65, 36.22,
            299.1, 1199.3, 3794.6]
    f = feed(DivergenceDetector(ruin=False), [st(i, loss=v) for i, v in enumerate(vals)])
    assert [x.step for x in f] == [14] and f[0].evidence["trigger"] == "fast"
    # with the ruin rules of issue #9 on, the giveback rule names it at the same step
    f = feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(vals)])
    assert [x.step for x in f][:1] == [14] and f[0].evidence["trigger"] in ("giveback", "fast")
    # one bad batch 1e4x above a converged loss, back down at once: not a runaway
    one = [2.3] + [1e-4] * 30 + [5.0, 1e-4, 1e-4]
    assert feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(one)]) == []
    # two high steps, but the last below the first loss of the run: near-convergence noise
    two = [2.3] + [1e-4] * 30 + [0.5, 1.5]
    assert feed(DivergenceDetector(), [st(i, loss=v) for i, v in enumerate(two)]) == []
    assert feed(DivergenceDetector(fast_factor=1e5, ruin=False), [st(i, loss=v) for i, v in enumerate(vals)]) == []


def test_divergence_slow_rule_when_the_run_never_improved():
    # bug: a run whose loss never beat its first value had "no progress to give back", so the
    # slow rule could not fire however far the loss climbed (zoo RNN seed 0: 1.5 -> 2e5)
    vals = [1.5] + [30.0] * 60 + [200.0] * 20
    f = feed(DivergenceDetector(fast_window=1, ruin=False), [st(i, loss=v) for i, v in enumerate(vals)])
    assert f and f[0].evidence["trigger"] == "slow"
    # the above-start rule of issue #9 sees it after 20 steps above 4x the start
    f = feed(DivergenceDetector(fast_window=1), [st(i, loss=v) for i, v in enumerate(vals)])
    assert f and f[0].evidence["trigger"] == "above_start" and f[0].step == 21
    flat = [1.5] + [30.0] * 80  # high but steady: not 4x its best (the slow rule)
    assert feed(DivergenceDetector(fast_window=1, ruin=False), [st(i, loss=v) for i, v in enumerate(flat)]) == []


# ----------------------------------------------------------------------------- plateau
def test_plateau_fires_when_stuck_above_half_initial():
    f = feed(PlateauDetector(), [st(i, loss=2.3) for i in range(200)])
    assert f and f[0].kind == "plateau" and not f[0].severe
    conv = feed(PlateauDetector(), [st(i, loss=2.3 * 0.97 ** i) for i in range(200)])
    assert conv == []


# ----------------------------------------------------------------------------- vanishing gradients
def test_vanishing_backward_ratio_with_patience():
    bad = [st(i, grads=[1e-6, 1.0]) for i in range(25)]
    f = feed(VanishingGradientDetector(), bad)
    assert len(f) == 1 and f[0].step == 19
    ok = [st(i, grads=[1e-3, 1.0]) for i in range(25)]
    assert feed(VanishingGradientDetector(), ok) == []
    short = [st(i, grads=[1e-6, 1.0]) for i in range(10)]
    assert feed(VanishingGradientDetector(), short) == []


def _acts(q0, q1):
    return {"a0": {"kind": "relu", "dead_fraction": 0.0, "saturated_fraction": None,
                   "second_moment": q0, "units": 8},
            "a1": {"kind": "relu", "dead_fraction": 0.0, "saturated_fraction": None,
                   "second_moment": q1, "units": 8}}


def test_vanishing_forward_ratio():
    assert feed(VanishingGradientDetector(), [st(0, acts=_acts(1.0, 1e-6))])
    assert feed(VanishingGradientDetector(), [st(0, acts=_acts(1.0, 1e-3))]) == []


def _rec(r):
    return {"rnn": {"kind": "recurrent", "dead_fraction": None, "saturated_fraction": None,
                    "second_moment": None, "steps": 100, "time_grad_ratio": r}}


def test_vanishing_through_time_uses_the_median_after_init():
    # the zoo's vanilla RNN (rho 0.9, T 100): probes of seed 0
    rnn = [1e-5, 6.9e-10, 2.4e-15, 6.9e-8, 3.2e-7, 1e-3]
    f = feed(VanishingGradientDetector(), [st(50 * i, acts=_rec(r)) for i, r in enumerate(rnn)])
    assert len(f) == 1 and f[0].step == 150 and f[0].evidence["through_time"]
    # its GRU repair: tiny at init and at the first probe, then open
    gru = [2.2e-19, 4.9e-6, 2e-3, 2e-2, 5.2e-2, 0.18]
    assert feed(VanishingGradientDetector(), [st(50 * i, acts=_rec(r)) for i, r in enumerate(gru)]) == []
    # healthy LSTM on the adding problem (T 15): 9e-4 at its lowest
    lstm = [3.1e-4, 8.9e-4, 1.1e-3, 1.4e-3, 1.5e-2]
    assert feed(VanishingGradientDetector(), [st(50 * i, acts=_rec(r)) for i, r in enumerate(lstm)]) == []
    assert feed(VanishingGradientDetector(time_ratio=1e-2),
                [st(50 * i, acts=_rec(r)) for i, r in enumerate(lstm)])


def test_vanishing_through_time_lets_a_new_cell_settle():
    """A GRU swapped in mid-run (structural repair) is probed every 5 steps while its path is
    still shut; the probes within 50 steps of its first one are not judged."""
    shut = [2.2e-19] + [1e-10] * 9 + [2e-3, 2e-2, 5e-2]
    steps = [150 + 5 * i for i in range(10)] + [200, 250, 300]
    assert feed(VanishingGradientDetector(),
                [st(t, acts=_rec(r)) for t, r in zip(steps, shut)]) == []
    # without the settling span the shut probes would have been called vanishing
    assert feed(VanishingGradientDetector(time_settle=1),
                [st(t, acts=_rec(r)) for t, r in zip(steps, shut)])
    with pytest.raises(ValueError):
        VanishingGradientDetector(time_settle=0)


def test_zero_gradient_detector():
    f = feed(ZeroGradientDetector(), [st(i, grads=[0.0, 0.5]) for i in range(20)])
    assert len(f) == 1 and f[0].kind == "vanishing_gradient"
    assert feed(ZeroGradientDetector(), [st(i, grads=[1e-12, 0.5]) for i in range(30)]) == []


def _gradless(i, grads, missing=(), frozen=()):
    s = st(i, grads=grads)
    s.missing_grad_modules, s.frozen_modules = missing, frozen
    return s


def test_zero_gradient_detector_leaves_out_modules_without_any_gradient():
    """A module with no gradient at all (frozen, or not reached by the loss: its 0.0 is a
    convention) is not a measured zero; a measured zero behind it still is."""
    assert feed(ZeroGradientDetector(), [_gradless(i, [0.0, 0.5, 0.3], frozen=("m0",))
                                         for i in range(60)]) == []
    f = feed(ZeroGradientDetector(), [_gradless(i, [0.0, 0.0, 0.3], frozen=("m0",))
                                      for i in range(20)])
    assert len(f) == 1 and f[0].where == "m1" and f[0].evidence["zero_modules"] == ["m1"]
    assert f[0].evidence["first_live_module"] == "m2" and f[0].severity == "warning"
    # one module left with a gradient: nothing to compare it with
    assert feed(ZeroGradientDetector(), [_gradless(i, [0.0, 0.0], frozen=("m0",))
                                         for i in range(40)]) == []


def test_no_gradient_note_after_twenty_steps_for_modules_that_want_one():
    """Parameters that require a gradient and never get one (a graph cut, a module the loss
    does not use): one information note at the 20th step in a row, naming the modules missing
    on every one of those steps; never for frozen modules, a gap resets the count, and nothing
    when no module gets a gradient at all (no backward: the loop check's)."""
    d = ZeroGradientDetector()
    out = feed(d, [_gradless(i, [0.0, 0.0, 0.4], missing=("m0", "m1")) for i in range(19)])
    assert out == []
    f = feed(d, [_gradless(19, [0.0, 0.0, 0.4], missing=("m0", "m1"))])
    assert len(f) == 1 and f[0].severity == "info" and f[0].evidence["cause"] == "no_gradient"
    assert f[0].where == "m0" and f[0].locations == ("m0", "m1") and f[0].evidence["steps"] == 20
    assert "exactly zero" not in f[0].message and "their parameters" in f[0].message
    assert feed(d, [_gradless(i, [0.0, 0.0, 0.4], missing=("m0", "m1")) for i in range(20, 60)]) == []
    # only what is missing on every step of the run is named; a gap starts over
    d = ZeroGradientDetector()
    stream = [_gradless(i, [0.0, 0.0, 0.4], missing=("m0", "m1") if i % 2 else ("m0",))
              for i in range(20)]
    f = feed(d, stream)
    assert len(f) == 1 and f[0].locations == ("m0",)
    d = ZeroGradientDetector()
    gap = [_gradless(i, [0.0, 0.5, 0.4], missing=() if i == 10 else ("m0",)) for i in range(30)]
    assert feed(d, gap) == []  # steps 11-29: 19 in a row
    assert len(feed(d, [_gradless(30, [0.0, 0.5, 0.4], missing=("m0",))])) == 1
    assert feed(ZeroGradientDetector(), [_gradless(i, [0.0, 0.5], frozen=("m0",))
                                         for i in range(60)]) == []
    assert feed(ZeroGradientDetector(), [_gradless(i, [0.0, 0.0], missing=("m0", "m1"))
                                         for i in range(60)]) == []


# ----------------------------------------------------------------------------- units
def _dead(frac):
    return {"h": {"kind": "relu", "dead_fraction": frac, "saturated_fraction": None,
                  "second_moment": 1.0, "units": 64}}


def test_dead_units_full_and_rise():
    assert feed(DeadUnitsDetector(), [st(0, acts=_dead(1.0))])
    assert feed(DeadUnitsDetector(), [st(0, acts=_dead(0.98))]) == []
    assert feed(DeadUnitsDetector(), [st(0, acts=_dead(0.1)), st(50, acts=_dead(0.7))])
    assert feed(DeadUnitsDetector(), [st(0, acts=_dead(0.3)), st(50, acts=_dead(0.65))]) == []


def test_dead_units_cause_and_healthy_step():
    born = feed(DeadUnitsDetector(), [st(0, acts=_dead(1.0))])
    assert born[0].evidence["cause"] == "born_dead" and "healthy_step" not in born[0].evidence
    d = DeadUnitsDetector()
    f = feed(d, [st(0, acts=_dead(0.1)), st(50, acts=_dead(0.2)), st(100, acts=_dead(1.0))])
    assert f[0].evidence["cause"] == "killed" and f[0].evidence["healthy_step"] == 50
    assert feed(d, [st(150, acts=_dead(1.0))]) == []  # reported once
    d.reset()  # a rollback restored older weights: a second kill is reported again
    f2 = feed(d, [st(151, acts=_dead(0.2)), st(156, acts=_dead(0.9))])
    assert f2 and f2[0].evidence["healthy_step"] == 151
    # born-dead layers stay reported across rollbacks
    b = DeadUnitsDetector()
    feed(b, [st(0, acts=_dead(1.0))])
    b.reset()
    assert feed(b, [st(1, acts=_dead(1.0))]) == []


def _sat(frac):
    return {"s": {"kind": "sigmoid", "dead_fraction": None, "saturated_fraction": frac,
                  "second_moment": 0.5, "units": 64}}


def test_saturation_threshold_and_patience():
    assert feed(SaturationDetector(), [st(0, acts=_sat(0.8)), st(50, acts=_sat(0.8))])
    assert feed(SaturationDetector(), [st(0, acts=_sat(0.8))]) == []
    assert feed(SaturationDetector(), [st(0, acts=_sat(0.7)), st(50, acts=_sat(0.7))]) == []


def test_a_plateau_is_noted_again_only_after_a_new_stage_of_progress():
    r = np.random.RandomState(0)
    # a loss resting on its own floor (a Poisson NLL at 0.73, batch noise 0.2 in log space):
    # each new 1% best of its noisy smoothed loss re-armed the note (3 notes here before; 6-7
    # in 3,000 steps of the real run, bench/giveback_noise.py)
    floor = list(np.linspace(1.0, 0.73, 200) * np.exp(0.2 * r.randn(200))) + list(
        0.73 * np.exp(0.2 * r.randn(2800)))
    notes = feed(PlateauDetector(), [st(i, loss=float(v)) for i, v in enumerate(floor)])
    assert len(notes) == 1 and notes[0].severity == "info"
    # a stall, then a new stage of progress (30% lower), then a stall again: two notes (the
    # second once the stall is half the run's age: its best at step ~513, noted at 1027)
    staged = [2.3] * 300 + list(np.linspace(2.3, 1.5, 200)) + [1.5] * 800
    assert [f.step for f in feed(PlateauDetector(), [st(i, loss=v) for i, v in enumerate(staged)])] == [119, 1027]


@pytest.mark.parametrize("seed", range(4))
def test_a_loss_still_falling_as_a_power_of_the_step_is_no_plateau(seed):
    # L = 1.9 + 1.4 (1 + t/20)^-0.5 with 5% batch noise: 2.25 at step 300, 2.01 at 3,000, as a
    # language model's loss falls (karpathy/makemore at its defaults, bench/makemore_trial.py);
    # the fixed 100-step window alone noted "not improved by 1% in 100 steps" at 370-492
    r = np.random.RandomState(seed)
    t = np.arange(3000)
    losses = (1.9 + 1.4 * (1 + t / 20.0) ** -0.5) * np.exp(0.05 * r.randn(3000))
    stream = [st(i, loss=float(v)) for i, v in enumerate(losses)]
    assert feed(PlateauDetector(), stream) == []
    assert len(feed(PlateauDetector(age_share=1e-9), stream)) == 1  # the fixed window alone
    # a run stuck from its start is noted when it was before
    assert [f.step for f in feed(PlateauDetector(), [st(i, loss=2.3) for i in range(400)])] == [119]
    # updates of 2% of the weights per step (nanoGPT at 100x its LR: 0.019) on the same slow
    # loss: noted at the fixed window, advising a lower learning rate
    for i, s in enumerate(stream):
        if i % 10 == 0:
            s.optimizer_state = {"update_ratio": 0.02}
    fast = feed(PlateauDetector(), stream)
    assert len(fast) == 1 and fast[0].step < 500 and fast[0].remedies[0].startswith("lower")


def test_after_a_rollback_a_falling_loss_is_no_plateau():
    # reset() sets the best to inf, and "ema < inf - 1% of inf" (NaN) was never true: a
    # loss falling after a rollback never made a new best, and 100 steps later it was "not
    # improved by 1% in 100 steps" with best inf, cause learning_rate: another rollback
    d = PlateauDetector()
    for t in range(100):
        d.update(StepStats(step=t, loss=2.3 - 0.005 * t, grad_norm=1.0))
    d.reset()
    out = []
    for t in range(100, 400):
        out += d.update(StepStats(step=t, loss=2.0 * 0.997 ** (t - 100), grad_norm=1.0))
    assert not out, out
    assert math.isfinite(d.best) and d.best < 1.0
