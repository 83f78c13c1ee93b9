"""Small batches (1-4 rows) at convergence: a layer whose units grew selective is not a layer
being killed (``DeadUnitsDetector.min_rows``), and one lucky batch is not the level a blow-up
started from (``DivergenceDetector.TYPICAL``)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import trainguard as tg
from trainguard.detect import DeadUnitsDetector, DivergenceDetector
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


def test_a_lucky_batch_is_not_where_a_blow_up_started():
    rng = np.random.default_rng(0)
    d = DivergenceDetector()
    out = []
    # a converged classifier at batch 4: most losses ~1e-2, a few lucky ones ~1e-5, and now
    # and then two hard examples in a row (~2-3)
    for t in range(2000):
        v = float(np.exp(rng.normal(np.log(1e-2), 1.0)))
        if t % 97 == 5:
            v = 1e-5  # 1,000x below the median: measured 100-4,700x
        if t % 97 in (9, 10):
            v = 2.5 + t % 2
        out += d.update(StepStats(step=t, loss=v, grad_norm=1.0))
    assert not [f for f in out if f.evidence.get("trigger") == "fast"]
    # a blow-up from a settled level is still one
    for t in range(2000, 2010):
        out += d.update(StepStats(step=t, loss=1e-2 * 10 ** (t - 2000), grad_norm=1.0))
    assert [f for f in out if f.evidence.get("trigger") == "fast"]
