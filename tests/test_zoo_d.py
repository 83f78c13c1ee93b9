"""Zoo part D: Z13, output-logit divergence. The premise (the bare bf16 run's logits drift to
log Z ~ -400 and bf16 costs it well over THRESHOLD nats), the repair (z-loss 1e-4 holds log Z
near 0 and the run passes) and the scenario's registration. One real, seeded CPU run of each
(~20-25 s apiece on one core)."""
from __future__ import annotations

import pytest
import torch

import trainguard as tg
from trainguard.zoo import REGISTRY, train
import trainguard.zoo.scenarios  # noqa: F401  (registers the scenarios)
from trainguard.zoo.scenarios import transformer_output_logit_divergence as z13

NAME = "transformer_output_logit_divergence"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def runs():
    """The bare run and the z-loss run on seed 0, shared by the tests below."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bare_setup, rep_setup = REGISTRY[NAME].build(0), z13.build(0, z_loss=1e-4)
        return {"bare": (train(bare_setup, "bare"), bare_setup),
                "zloss": (train(rep_setup, "bare"), rep_setup)}
    finally:
        torch.set_num_threads(n)


def _heldout_log_z(setup) -> float:
    ids, _ = z13.word_data()
    xe, _ = z13.lm_eval_batch(ids, int(len(ids) * 0.9), len(ids), 256, z13.SEQ)
    return float(z13.log_z(setup.model, xe).mean())


def test_z13_is_registered():
    s = REGISTRY[NAME]
    assert s.category == "pathological"
    assert s.expected and set(s.expected) <= set(tg.FINDING_KINDS)
    assert not s.repairable_online and "z-loss" in s.prescription
    assert s.reference == z13.THRESHOLD


@pytest.mark.slow
def test_bare_run_drifts_and_fails(runs):
    s = REGISTRY[NAME]
    r, setup = runs["bare"]
    assert r.finished and not r.nonfinite
    assert _heldout_log_z(setup) < -200  # the logits have drifted far below 0
    assert r.metric > 2 * z13.THRESHOLD
    assert not s.passed(r), f"the bare run should fail its criterion ({s.criterion})"


@pytest.mark.slow
def test_z_loss_repairs_it(runs):
    s = REGISTRY[NAME]
    r, setup = runs["zloss"]
    assert abs(_heldout_log_z(setup)) < 100
    assert s.passed(r), f"z-loss should pass ({s.criterion}); metric {r.metric:.3f}"
