"""Zoo part B: for the fast scenarios, the premise (the bare run fails its criterion) and
what the Guard finds. Real, seeded, CPU training runs of a few hundred steps each."""
from __future__ import annotations

import math

import pytest
import torch

import trainguard as tg
from trainguard.zoo import REGISTRY, train
import trainguard.zoo.scenarios  # noqa: F401  (registers the scenarios)

PART_B = ["adam_epsilon_trap", "adam_rare_bad_batch", "adam_stale_second_moment",
          "data_nan_input", "data_small_batch", "precision_fp16_softmax_overflow",
          "precision_fp16_grad_underflow", "precision_bf16_swamping"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def guarded(name: str, seed: int = 0):
    s = REGISTRY[name]
    return train(s.build(seed), "guarded",
                 guard_factory=lambda st: tg.Guard(st.model, st.optimizer, scaler=st.scaler,
                                                   console=False, **st.guard_kwargs))


def bare(name: str, seed: int = 0):
    return train(REGISTRY[name].build(seed), "bare")


def first(r, kind: str):
    return next((f for f in r.findings if f.kind == kind), None)


def test_part_b_scenarios_are_registered():
    # completeness of every scenario is checked once, in tests/test_zoo.py
    assert all(REGISTRY[n].category == "pathological" for n in PART_B)
    assert sum(REGISTRY[n].fast for n in PART_B) >= 3


@pytest.mark.parametrize("name", [n for n in PART_B if REGISTRY[n].fast])
def test_fast_scenario_fails_bare(name):
    s = REGISTRY[name]
    r = bare(name)
    assert r.finished
    assert not s.passed(r), f"{name}: the bare run should fail its criterion ({s.criterion})"


def test_epsilon_trap_premise_and_control():
    from trainguard.zoo.scenarios import adam_epsilon_trap as m
    s = REGISTRY["adam_epsilon_trap"]
    r = bare("adam_epsilon_trap")
    assert r.metric > 2.0  # stuck at chance, ln 10
    assert s.passed(train(m.build(0, eps=1e-15)))  # the prescribed eps fixes it
    g = guarded("adam_epsilon_trap")
    assert first(g, "plateau") is not None
    assert not any(f.severe for f in g.findings)  # a stall, not an alarm


def test_nan_input_guard_skips_the_bad_batch():
    from trainguard.zoo.scenarios.data_nan_input import BAD_STEP
    s = REGISTRY["data_nan_input"]
    r = bare("data_nan_input")
    assert math.isnan(r.losses[-1])  # one NaN batch poisons the bare run for good
    g = guarded("data_nan_input")
    f = first(g, "nonfinite")
    assert f is not None and f.step == BAD_STEP
    assert [a.kind for a in g.actions if a.step == BAD_STEP] == ["skip"]
    assert s.passed(g)


def test_rare_bad_batch_guard_spots_and_skips_it():
    from trainguard.zoo.scenarios.adam_rare_bad_batch import BAD_STEP
    s = REGISTRY["adam_rare_bad_batch"]
    g = guarded("adam_rare_bad_batch")
    assert first(g, "loss_spike").step == BAD_STEP
    assert first(g, "grad_explosion").step == BAD_STEP
    assert any(a.kind == "skip" and a.step == BAD_STEP for a in g.actions)
    assert s.passed(g)


def test_fp16_softmax_overflow_is_nonfinite_and_guard_keeps_weights_finite():
    s = REGISTRY["precision_fp16_softmax_overflow"]
    r = bare("precision_fp16_softmax_overflow")
    assert not math.isfinite(r.metric)
    g = guarded("precision_fp16_softmax_overflow")
    f = first(g, "nonfinite")
    assert f is not None and f.step > 50  # overflow comes once the classifier is confident
    assert s.passed(g)


def test_fp16_grad_underflow_premise_and_zero_gradient_finding():
    from trainguard.zoo.scenarios import precision_fp16_grad_underflow as m
    s = REGISTRY["precision_fp16_grad_underflow"]
    assert not s.passed(bare("precision_fp16_grad_underflow"))
    assert s.passed(train(m.build(0, loss_scale=2.0 ** 16)))  # loss scaling is the cure
    g = guarded("precision_fp16_grad_underflow")
    f = first(g, "vanishing_gradient")
    assert f is not None and f.where == "layers.0" and f.step < 50


# --- ZeroGradientDetector on synthetic streams -------------------------------------------
def _stats(step, norms, loss=1.0):
    return tg.StepStats(step=step, loss=loss, grad_norm=float(sum(n * n for n in norms)) ** 0.5,
                        modules=[f"m{i}" for i in range(len(norms))], grad_norms=list(norms))


def test_zero_gradient_detector_rule():
    from trainguard.detect.gradient_flow import ZeroGradientDetector
    d = ZeroGradientDetector(patience=20)
    out = [f for t in range(19) for f in d.update(_stats(t, [0.0, 0.0, 1e-7]))]
    assert out == []
    out = d.update(_stats(19, [0.0, 0.0, 1e-7]))
    assert [f.kind for f in out] == ["vanishing_gradient"]
    assert out[0].locations == ("m0", "m1")
    assert d.update(_stats(20, [0.0, 0.0, 1e-7])) == []  # reported once


def test_zero_gradient_detector_quiet_on_tiny_but_nonzero_and_on_interruptions():
    from trainguard.detect.gradient_flow import ZeroGradientDetector
    d = ZeroGradientDetector(patience=20)
    assert not [f for t in range(100) for f in d.update(_stats(t, [1e-30, 1e-3, 1.0]))]
    d = ZeroGradientDetector(patience=20)
    stream = [[0.0, 1.0] if t % 10 else [1e-3, 1.0] for t in range(100)]
    assert not [f for t, n in enumerate(stream) for f in d.update(_stats(t, n))]
    d = ZeroGradientDetector(patience=5)  # all-zero gradient: nothing is live, no finding
    assert not [f for t in range(20) for f in d.update(_stats(t, [0.0, 0.0]))]
