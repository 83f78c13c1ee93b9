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


def test_logit_drift_fires_on_a_steady_outward_drift_only():
    """detect.logits: three probes beyond |log Z| = 100, each further out (the zoo's Z13 drifts
    ~-0.024 per step to -400); the z-loss runs' range (-16...-65) and a single odd probe are
    silent; the finding's cause is logit_drift and the default policy only reports it."""
    import trainguard as tg
    from trainguard.detect import LogitDriftDetector
    from trainguard.types import StepStats

    def probe(step, lz):
        return StepStats(step=step, loss=3.0, grad_norm=1.0, output_log_z=lz)
    d = LogitDriftDetector()
    out = [f for i, lz in enumerate([-16, -40, -65, -50, -64]) for f in d.update(probe(i, lz))]
    assert out == []
    d = LogitDriftDetector()
    out = [f for i, lz in enumerate([-90, -120, -110, -105, -130, -150, -170])
           for f in d.update(probe(i, lz))]
    # -105 restarts the streak (not further out than -110), -130 and -150 complete it
    assert [f.step for f in out] == [5] and out[0].evidence["cause"] == "logit_drift"
    assert out[0].kind == "divergence" and out[0].where == "(output)"
    assert tg.Policy().decide(out, 5).actions == []
