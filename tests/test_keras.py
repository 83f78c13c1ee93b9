"""Keras 3 adapter (issue #11, item 1): real Keras training under the TensorFlow and PyTorch
backends (each case runs in its own process: Keras picks its backend at import)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("keras")
HERE = os.path.join(os.path.dirname(__file__), "keras_cases", "cases.py")
BACKENDS = ["tensorflow", "torch"]


CASES = {"tensorflow": ["healthy_fit", "nan_batch_fit", "lr_too_high_fit", "deep_sigmoid_fit",
                        "tape_loop", "bad_input", "zoo_subset", "unused_layer_fit",
                        "unused_layer_tape"],
         "torch": ["healthy_fit", "nan_batch_fit", "lr_too_high_fit", "tape_loop",
                   "unused_layer_fit", "unused_layer_tape"]}
_results: dict[str, dict] = {}


def run(name, backend):
    """Every case of a backend runs in one process (Keras picks its backend at import; one
    import of TensorFlow, not one per case)."""
    if backend == "tensorflow":
        pytest.importorskip("tensorflow")
    if backend not in _results:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
                   CUDA_VISIBLE_DEVICES="")
        r = subprocess.run([sys.executable, HERE, *CASES[backend]], capture_output=True,
                           text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        _results[backend] = json.loads(r.stdout.strip().splitlines()[-1])
    return _results[backend][name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_healthy_fit_is_silent_and_identical_to_bare(backend):
    r = run("healthy_fit", backend)
    assert r["findings"] == [] and r["actions"] == [], r
    if backend == "torch":
        assert r["same"], r  # bit for bit
    else:
        # TF graph mode runs the guarded update inside ops.cond (as Keras' LossScaleOptimizer
        # does), whose kernels round slightly differently; eager mode is bit for bit
        mse0, mse1 = r["mse"]
        assert abs(mse1 - mse0) < 0.15 * mse0, r


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_batch_is_skipped_inside_the_optimizer(backend):
    r = run("nan_batch_fit", backend)
    assert r["skips"] == [9] and r["finite"], r
    assert r["iterations"] == 15  # 16 batches, one update vetoed: iterations count applied ones


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_too_high_is_repaired_or_halted(backend):
    r = run("lr_too_high_fit", backend)
    assert r["bare_mse"] is None or r["bare_mse"] > 10 * 0.05, r
    assert r["finite"], r
    assert r["halted"] or (r["mse"] is not None and r["mse"] < r["bare_mse"]), r
    assert set(r["actions"]) & {"lr_backoff", "rollback", "halt"}, r


@pytest.mark.parametrize("backend", ["tensorflow"])
def test_deep_sigmoid_is_named_vanishing(backend):
    r = run("deep_sigmoid_fit", backend)
    assert "vanishing_gradient" in r["findings"], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_tape_loop_and_exact_rollback(backend):
    r = run("tape_loop", backend)
    assert r["truthful"], r
    assert r["skips"] == [9] and r["iterations"] == 15, r
    assert r["rolled_back"], r
    assert r["suspects"] == [[300]], r  # the NaN row, from the per-row losses


def test_bad_input_is_refused_clearly():
    r = run("bad_input", "tensorflow")
    assert "keras.optimizers.Optimizer" in r["wrap"]
    assert "shape" in r["shape"] and "expected" in r["shape"]


def test_keras_zoo_scenarios_fail_bare_and_are_repaired():
    r = run("zoo_subset", "tensorflow")
    for name, rec in r.items():
        assert not rec["bare_ok"] and rec["guarded_ok"] and rec["named"], (name, rec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_the_loss_never_uses_trains_and_is_named_once(backend):
    r = run("unused_layer_fit", backend)
    assert r["finite"] and r["steps"] == 32, r
    aux = r["modules"][0]
    assert r["missing"] == [aux], r
    assert r["findings"] == [["vanishing_gradient", "info", aux, "no_gradient"]], r


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_the_loss_never_uses_trains_in_a_tape_loop_as_bare(backend):
    r = run("unused_layer_tape", backend)
    assert r["same"] and r["steps"] == 32 and not r["actions"], r
    aux = r["modules"][0]
    assert r["missing"] == [aux], r
    assert r["findings"] == [["vanishing_gradient", "info", aux, "no_gradient"]], r
