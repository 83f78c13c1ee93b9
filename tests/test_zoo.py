"""Zoo part A (healthy controls, signal propagation, recurrent, curvature): for every scenario
marked fast, its premise (the bare run fails or passes its criterion as stated) and what the
Guard does (names the mechanism on pathological runs, stays silent on healthy ones). Real,
seeded CPU training runs of a few hundred steps; plus the runner's scoring and JSON output."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import trainguard as tg
from trainguard.zoo import REGISTRY, train
import trainguard.zoo.scenarios  # noqa: F401  (registers the scenarios)
from trainguard.zoo import runner

PART_A_PREFIXES = ("healthy_", "signal_", "recurrent_", "curvature_")
PART_A = sorted(n for n in REGISTRY if n.startswith(PART_A_PREFIXES))
FAST = [n for n in PART_A if REGISTRY[n].fast]
#: detected with a severe finding, but the first name is not yet in ``expected`` (see docs/zoo.md)
NAMED_LATE = {"recurrent_exploding_rnn"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def guarded(name: str, seed: int = 0):
    return train(REGISTRY[name].build(seed), "guarded", guard_factory=runner._guard_factory)


def test_registry_is_complete():
    """Every registered scenario (parts A, B and C) states its mechanism, source, criterion and
    expected kinds, and a prescription when a running guard cannot repair it."""
    healthy = [n for n in PART_A if REGISTRY[n].category == "healthy"]
    path = [n for n in PART_A if REGISTRY[n].category == "pathological"]
    assert len(healthy) >= 8 and len(path) >= 8
    for n, s in REGISTRY.items():
        assert s.mechanism and s.source and s.criterion
        assert set(s.expected) <= set(tg.FINDING_KINDS)
        if s.category == "pathological":
            assert s.expected
            if not s.repairable_online:
                assert s.prescription
        else:
            assert not s.expected
        if n in PART_A:
            assert runner.reference_of(s) is not None
    assert len(FAST) >= 8


@pytest.mark.parametrize("name", FAST)
def test_fast_scenario_premise_and_guard(name):
    s = REGISTRY[name]
    bare = train(s.build(0), "bare")
    g = guarded(name)
    if s.category == "healthy":
        assert s.passed(bare), f"{name}: healthy control must pass bare ({s.criterion})"
        assert not runner.false_alarm(g), [str(f) for f in g.findings] + [str(a) for a in g.actions]
        assert s.passed(g)
    else:
        assert not s.passed(bare), f"{name}: must fail bare ({s.criterion})"
        assert runner.detected(s, g), f"{name}: nothing detected"
        if name not in NAMED_LATE:
            assert any(f.kind in s.expected for f in g.findings), [str(f) for f in g.findings]


def test_repaired_configs_pass():
    """Each structural scenario's prescription, applied, passes its own criterion."""
    from trainguard.zoo.scenarios import signal_dying_relu, signal_propagation
    s = REGISTRY["signal_sigmoid_vanishing"]
    assert s.passed(train(signal_propagation.build_sigmoid(0, init="xavier")))
    s = REGISTRY["signal_residual_unnormalised"]
    assert s.passed(train(signal_propagation.build_residual(0, zero_last=True)))
    s = REGISTRY["signal_dying_relu_born_dead"]
    assert s.passed(train(signal_dying_relu.build(0, width=10)))
    assert s.passed(train(signal_dying_relu.build(0, width=5, act=lambda: torch.nn.LeakyReLU(0.1))))


def test_gd_past_limit_is_repaired_online():
    s = REGISTRY["curvature_gd_past_limit"]
    g = guarded("curvature_gd_past_limit")
    # the early runaway rule names the growing gradient first (a clip, step 2 on seed 0), the
    # loss-ruin rule's rollback + LR backoff follows when the loss blows up (issue #13)
    assert g.findings[0].kind in ("grad_explosion", "divergence") and g.findings[0].step <= 4
    assert "divergence" in [f.kind for f in g.findings]
    assert {"rollback", "lr_backoff"} <= {a.kind for a in g.actions}
    assert s.passed(g)


def test_runner_json_and_totals(tmp_path):
    p = argparse.ArgumentParser()
    runner.add_arguments(p)
    out = tmp_path / "zoo.json"
    args = p.parse_args(["--only", "healthy_linear_gd", "curvature_gd_past_limit", "--json",
                         str(out), "--no-baselines"])
    assert runner.run(args) == 0
    recs = json.loads(out.read_text())
    assert {r["scenario"] for r in recs} == {"healthy_linear_gd", "curvature_gd_past_limit"}
    for r in recs:
        for key in ("scenario", "category", "mechanism", "bare_ok", "guarded_ok", "findings",
                    "first_detection_step", "actions", "seconds_bare", "seconds_guarded"):
            assert key in r
    path = next(r for r in recs if r["category"] == "pathological")
    assert path["bare_metric"] == "Infinity"  # non-finite numbers spelled as strings
    assert not path["bare_ok"] and path["guarded_ok"] and "divergence" in path["findings"]
    tot = runner.totals([json.loads(json.dumps(r)) for r in recs])
    assert tot["false_alarm_rate"] == 0 and tot["detection_recall"] == 1


def test_random_baseline_is_seeded():
    s = REGISTRY["healthy_linear_gd"]
    a = runner.baseline_random(s.build(0), 0, s.name).describe
    b = runner.baseline_random(s.build(0), 0, s.name).describe
    assert a == b
