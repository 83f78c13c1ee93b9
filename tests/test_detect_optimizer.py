"""OptimizerStallDetector on synthetic streams: each threshold on both sides."""
import pytest

from trainguard.detect.optimizer import OptimizerStallDetector
from trainguard.types import StepStats


def stream(det, states):
    out = []
    for i, st in enumerate(states):
        out += det.update(StepStats(step=i, loss=1.0, grad_norm=1.0, optimizer_state=st))
    return out


def test_epsilon_trap_needs_two_probes_above_threshold():
    d = OptimizerStallDetector()
    assert not stream(d, [{"eps_dominated_fraction": 0.95, "eps": 1e-8}, None,
                          {"eps_dominated_fraction": 0.5, "eps": 1e-8}])
    f = stream(OptimizerStallDetector(), [{"eps_dominated_fraction": 0.95, "eps": 1e-8}] * 3)
    assert len(f) == 1 and f[0].kind == "plateau" and f[0].evidence["cause"] == "adam_epsilon"
    assert "eps" in f[0].remedies[0]
    assert not stream(OptimizerStallDetector(), [{"eps_dominated_fraction": 0.89, "eps": 1e-8}] * 5)


def test_swamping_threshold():
    f = stream(OptimizerStallDetector(), [{"swamped_fraction": 0.6}] * 2)
    assert [x.evidence["cause"] for x in f] == ["update_swamping"]
    assert not stream(OptimizerStallDetector(), [{"swamped_fraction": 0.4}] * 4)


def test_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="eps_fraction"):
        OptimizerStallDetector(eps_fraction=1.5)
