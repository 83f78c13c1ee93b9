"""Small batches (1-4 rows) at convergence: a layer whose units grew selective is not a layer
being killed (``DeadUnitsDetector.min_rows``), one lucky batch is not the level a blow-up
started from (``DivergenceDetector.TYPICAL``), and at one example per step hard examples are
neither a blow-up (``DivergenceDetector.BLOWUP_NOISE``) nor a spike (losses that underflow to 0
stay in log space) nor a stall (``PlateauDetector``: the mean over the stall), and after a
rollback the early spike rules count the start's scale."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import trainguard as tg
from trainguard.detect import (DeadUnitsDetector, DivergenceDetector, GradExplosionDetector,
                               LossSpikeDetector, PlateauDetector)
from trainguard.types import StepStats


def acts(frac: float, rows: int | None) -> dict:
    rec = {"kind": "relu", "dead_fraction": frac, "saturated_fraction": None,
           "second_moment": 1.0, "units": 128}
    if rows is not None:
        rec["rows"] = rows
    return {"1": rec}


def stream(d: DeadUnitsDetector, rows: int | None, last: float) -> list:
    out = []
    for t, frac in enumerate((0.26, 0.4, 0.5, last)):
        out += d.update(StepStats(step=100 * t, loss=1.0, grad_norm=1.0,
                                  activations=acts(frac, rows)))
    return out


def test_units_killed_need_enough_rows_a_dead_layer_does_not():
    assert not stream(DeadUnitsDetector(), rows=4, last=0.66)
    found = stream(DeadUnitsDetector(), rows=32, last=0.66)
    assert found and found[0].evidence["cause"] == "killed"
    assert stream(DeadUnitsDetector(), rows=None, last=0.66)  # rows unknown: as before
    dead = stream(DeadUnitsDetector(), rows=2, last=1.0)  # a whole layer, on 2 rows
    assert dead and dead[0].kind == "dead_units"


def digits_batch4(steps: int, smoothing: float = 0.1) -> tg.Guard:
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(d.target)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(m.parameters(), 0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss(label_smoothing=smoothing)
    guard = tg.Guard(m, opt, console=False)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (4,))
        opt.zero_grad()
        loss = crit(m(X[idx]), Y[idx])
        loss.backward()
        guard.step(loss)
    return guard


def test_a_batch_of_4_reports_its_rows_and_no_layer_killed():
    g = digits_batch4(1500)
    sampled = [s for s in g.history if s.activations]
    assert sampled and all(s.activations["1"]["rows"] == 4 for s in sampled)
    assert not [f for f in g.findings if f.kind == "dead_units"]
    assert g.action_counts["rollback"] == 0


def blow_ups(losses: "list[float]", d: DivergenceDetector | None = None) -> list:
    """The fast (blow-up) findings of a DivergenceDetector fed ``losses``."""
    d = d or DivergenceDetector()
    return [f for t, v in enumerate(losses)
            for f in d.update(StepStats(step=t, loss=float(v), grad_norm=1.0))
            if f.evidence.get("trigger") == "fast"]


def test_a_lucky_batch_is_not_where_a_blow_up_started():
    rng = np.random.default_rng(0)
    # a converged classifier at batch 4: most losses ~1e-2, a few lucky ones ~1e-5, and now
    # and then two hard examples in a row (~2-3)
    v = np.exp(rng.normal(np.log(1e-2), 1.0, 2000))
    t = np.arange(2000)
    v[t % 97 == 5] = 1e-5  # 1,000x below the median: measured 100-4,700x
    v[t % 97 == 9], v[t % 97 == 10] = 2.5 + (t[t % 97 == 9] % 2), 2.5 + (t[t % 97 == 10] % 2)
    d = DivergenceDetector()
    assert not blow_ups(list(v), d)
    # a blow-up from a settled level is still one
    assert blow_ups(list(v) + [1e-2 * 10 ** k for k in range(10)], DivergenceDetector())


def digits_batch1(steps: int, guarded: bool, seed: int = 0) -> tuple[nn.Module, tg.Guard | None]:
    """The textbook loop: one example per step, momentum SGD (no mistake in it: bare, it
    reaches ~95-98% training accuracy)."""
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(d.target)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(m.parameters(), 0.01, momentum=0.9)
    guard = tg.Guard(m, opt, console=False) if guarded else None
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (1,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(X[idx]), Y[idx])
        loss.backward()
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
    return m, guard


def test_one_example_per_step_with_momentum_trains_as_bare():
    # Its single-example losses span 0 (an underflow, 6-8% of the steps) to ~5 once it has
    # converged: hard examples were taken for runaway blow-ups (two or three in a row after a
    # confident one: "the loss grew 1.6e+04x in 2 steps"), for raw-value spikes (the zeros
    # sent the spike rule to the raw values), and a burst of them for a stall; the rollbacks
    # and LR cuts that answered them halted this run at step 4,985 after 8 rollbacks
    # (python bench/small_batch.py --src OLD/src: momentum, batch 1, seed 0)
    m, g = digits_batch1(2500, guarded=True)
    bare, _ = digits_batch1(2500, guarded=False)
    assert g is not None
    assert not [f for f in g.findings if f.severe], g.findings
    assert not g.actions
    for p, q in zip(m.parameters(), bare.parameters()):
        assert torch.equal(p, q)
    g.close()


def test_hard_examples_in_a_heavy_tailed_stream_are_no_blow_up():
    # a converged batch-1 classifier: log-losses spread ~2.5 nats a step, some underflow to
    # 0, and now and then a hard example (3-5) after a confident one and an uncertain one
    rng = np.random.default_rng(1)
    t = np.arange(3000)
    v = np.exp(rng.normal(np.log(1e-3), 2.5, 3000))
    v[t % 53 == 7] = 0.0
    v[t % 89 == 20], v[t % 89 == 21] = 1e-4, 0.05
    v[t % 89 == 22] = 3.0 + (t[t % 89 == 22] % 3)
    assert not blow_ups(list(v))
    # the same rise from a settled level (noise 0.3) is a blow-up
    v = np.exp(rng.normal(np.log(1e-3), 0.3, 200))
    v[180], v[181], v[182] = 1e-4, 0.05, 3.0
    assert blow_ups(list(v))


def test_a_loss_that_underflows_to_zero_keeps_the_log_space_spike_rule():
    rng = np.random.default_rng(2)
    d = LossSpikeDetector()
    out = []
    for t in range(2000):
        z = float(np.clip(rng.normal(), -3, 3))
        v = 0.0 if t % 13 == 0 else float(np.exp(np.log(1e-3) + 2.5 * z))
        if t % 211 == 100:
            v = 2.0  # a hard example: 2,000x the median, 3 sigmas in log space
        out += d.update(StepStats(step=t, loss=v, grad_norm=1.0))
    assert not out  # before, the zeros sent the rule to the raw values: a spike each time
    assert d._log_moments() is not None
    # a real spike among zeros is still one: 1e7x the median of a narrow stream
    d = LossSpikeDetector()
    out = []
    for t in range(200):
        v = 0.0 if t % 13 == 0 else float(np.exp(rng.normal(np.log(1e-3), 0.3)))
        out += d.update(StepStats(step=t, loss=v if t != 150 else 5.0, grad_norm=1.0))
    assert [f.step for f in out] == [150]


def test_after_a_rollback_the_early_rules_need_the_start_scale():
    g, sp = GradExplosionDetector(), LossSpikeDetector()
    for t in range(100):
        g.update(StepStats(step=t, loss=1.0, grad_norm=2.8 * (1 + 0.1 * (t % 3))))
        sp.update(StepStats(step=t, loss=2.3 * (1 + 0.1 * (t % 3)), grad_norm=1.0))
    g.reset()
    sp.reset()
    # the restored weights: a confident example first, then ordinary ones below the start scale
    out = g.update(StepStats(step=100, loss=1.0, grad_norm=6e-7))
    out += g.update(StepStats(step=101, loss=1.0, grad_norm=4e-4))
    out += g.update(StepStats(step=102, loss=1.0, grad_norm=0.6))
    out += sp.update(StepStats(step=100, loss=1e-7, grad_norm=1.0))
    out += sp.update(StepStats(step=101, loss=0.5, grad_norm=1.0))
    assert not out
    # a real explosion after the rollback is still one
    assert g.update(StepStats(step=103, loss=1.0, grad_norm=500.0))
    assert sp.update(StepStats(step=102, loss=1e7, grad_norm=1.0))


def test_a_burst_of_hard_examples_is_no_stall():
    rng = np.random.default_rng(3)
    d = PlateauDetector()
    out = []
    for t in range(3000):
        v = 2.3 * float(np.exp(-t / 100)) + float(np.exp(rng.normal(np.log(1e-3), 2.0)))
        if t > 1000 and t % 400 == 0:
            v = 5.0
        if t > 1000 and t % 400 in (1, 2, 3, 5):
            v = 3.5  # momentum mispredicts the next few
        out += d.update(StepStats(step=t, loss=v, grad_norm=1.0))
    assert not out
    # a loss that stays up is a stall
    for t in range(3000, 3400):
        out += d.update(StepStats(step=t, loss=2.0 + 0.1 * float(rng.normal()), grad_norm=1.0))
    assert [f.kind for f in out] == ["plateau"]

