"""The Keras subset of the stability zoo: ``trainguard zoo --framework keras``.

Each scenario is a small seeded Keras 3 run (``model.fit``), bare and with
:class:`trainguard.integrations.keras.Guard`, scored with the torch zoo's totals (recall, named
mechanism, false alarms, online repair). Scenarios mirror torch zoo entries so docs/zoo.md can show
them side by side:

=================================  ===================================  =========================
Keras scenario                     mechanism                            torch zoo counterpart
=================================  ===================================  =========================
keras_healthy_mlp_adam             healthy control                      healthy_mlp_regressor
keras_healthy_cnn                  healthy control                      healthy_cnn
keras_signal_sigmoid_vanishing         vanishing gradients (12 sigmoids)    signal_deep_sigmoid
keras_curvature_sgd_past_limit     GD past 2/lambda_max                 curvature_gd_past_limit
keras_data_nan_batch               one NaN input batch                  data_nan_input
keras_rare_huge_batch              one batch x1e5 under SGD+momentum    adam_rare_bad_batch
keras_recurrent_exploding_rnn      vanilla ReLU RNN, recurrent gain 1.6   recurrent_exploding_rnn
=================================  ===================================  =========================

The backend is Keras' own (``KERAS_BACKEND``; TensorFlow by default).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .base import RunResult


@dataclass
class KerasScenario:
    name: str
    category: str
    mechanism: str
    expected: tuple[str, ...]
    criterion: str
    build: Callable[[int], dict[str, Any]]
    threshold: float
    higher_is_better: bool = False
    repairable_online: bool = True
    onset: int = 0
    source: str = ""
    prescription: str = ""
    counterpart: str = ""


def _digits(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


def _seed(seed: int) -> Any:
    import keras
    keras.utils.set_random_seed(seed)
    return keras


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    with np.errstate(all="ignore"):
        p = np.asarray(model.predict(x, verbose=0))
    if not np.isfinite(p).all():
        return 0.0
    return float((p.argmax(1) == y).mean())


def _mse(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    with np.errstate(all="ignore"):
        p = np.asarray(model.predict(x, verbose=0))
        v = float(np.mean((p - y) ** 2))
    return v if math.isfinite(v) else math.inf


def _mlp_digits(seed: int, *, act: str = "relu", depth: int = 1, width: int = 64,
                opt: str = "adam", lr: float = 1e-3, epochs: int = 6,
                poison: Callable[[np.ndarray], None] | None = None) -> dict[str, Any]:
    keras = _seed(seed)
    xtr, ytr, xte, yte = _digits(seed)
    if poison is not None:
        xtr = xtr.copy()
        poison(xtr)
    layers = [keras.Input((64,))] + [keras.layers.Dense(width, activation=act)
                                     for _ in range(depth)] + [keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    optimizer = (keras.optimizers.Adam(lr) if opt == "adam"
                 else keras.optimizers.SGD(lr, momentum=0.9 if opt == "momentum" else 0.0))
    return {"model": model, "optimizer": optimizer, "x": xtr, "y": ytr, "epochs": epochs,
            "batch": 32, "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "evaluate": lambda m: _accuracy(m, xte, yte)}


def build_healthy_mlp(seed: int) -> dict[str, Any]:
    return _mlp_digits(seed)


def build_healthy_cnn(seed: int) -> dict[str, Any]:
    keras = _seed(seed)
    xtr, ytr, xte, yte = _digits(seed)
    model = keras.Sequential([
        keras.Input((64,)), keras.layers.Reshape((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(10)])
    return {"model": model, "optimizer": keras.optimizers.SGD(0.05, momentum=0.9), "x": xtr,
            "y": ytr, "epochs": 6, "batch": 32,
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "evaluate": lambda m: _accuracy(m, xte, yte)}


def build_deep_sigmoid(seed: int) -> dict[str, Any]:
    return _mlp_digits(seed, act="sigmoid", depth=12, width=32, opt="sgd", lr=0.05, epochs=4)


def _once(setup: dict[str, Any], epochs: int) -> dict[str, Any]:
    """``epochs`` passes over the data as one epoch, so a poisoned batch occurs once."""
    setup["x"] = np.concatenate([setup["x"]] * epochs)
    setup["y"] = np.concatenate([setup["y"]] * epochs)
    setup["epochs"] = 1
    return setup


def build_nan_batch(seed: int) -> dict[str, Any]:
    setup = _once(_mlp_digits(seed), 4)
    setup["x"][32 * 20 + 3, 5] = np.nan  # one sample of batch 20
    return setup


def build_rare_huge_batch(seed: int) -> dict[str, Any]:
    setup = _once(_mlp_digits(seed, opt="momentum", lr=0.05), 3)
    setup["x"][32 * 30:32 * 31] *= 1e5  # one corrupted batch (a unit error upstream)
    return setup


def build_sgd_past_limit(seed: int) -> dict[str, Any]:
    keras = _seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, 8)).astype("float32") * np.linspace(0.5, 2.0, 8).astype("float32")
    w = rng.normal(size=(8, 1)).astype("float32")
    y = (x @ w + 0.1 * rng.normal(size=(512, 1))).astype("float32")
    lam = float(np.linalg.eigvalsh(2.0 / len(x) * x.T @ x).max())
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    xte = rng.normal(size=(256, 8)).astype("float32") * np.linspace(0.5, 2.0, 8).astype("float32")
    yte = (xte @ w).astype("float32")
    return {"model": model, "optimizer": keras.optimizers.SGD(1.5 * 2.0 / lam), "x": x, "y": y,
            "epochs": 10, "batch": 512 // 8, "loss": "mse",
            "evaluate": lambda m: _mse(m, xte, yte)}


def build_exploding_rnn(seed: int) -> dict[str, Any]:
    keras = _seed(seed)
    rng = np.random.default_rng(seed)
    t, n = 30, 1024
    x = rng.uniform(-1, 1, size=(n, t, 1)).astype("float32")
    y = x[:, :5, 0].sum(1, keepdims=True).astype("float32")  # remember the first 5 inputs
    model = keras.Sequential([
        keras.Input((t, 1)),
        keras.layers.SimpleRNN(32, activation="relu",
                               recurrent_initializer=keras.initializers.Orthogonal(gain=RNN_GAIN)),
        keras.layers.Dense(1)])
    xte = rng.uniform(-1, 1, size=(256, t, 1)).astype("float32")
    yte = xte[:, :5, 0].sum(1, keepdims=True).astype("float32")
    return {"model": model, "optimizer": keras.optimizers.SGD(1e-3), "x": x, "y": y,
            "epochs": 3, "batch": 32, "loss": "mse", "evaluate": lambda m: _mse(m, xte, yte)}


RNN_GAIN = 1.6

SCENARIOS = [
    KerasScenario("keras_healthy_mlp_adam", "healthy", "healthy control: digits MLP 64-64-10, Adam",
                  (), "held-out accuracy > 0.9", build_healthy_mlp, 0.9, higher_is_better=True,
                  counterpart="healthy_mlp_regressor"),
    KerasScenario("keras_healthy_cnn", "healthy", "healthy control: small CNN on 8x8 digits, SGD "
                  "momentum", (), "held-out accuracy > 0.85", build_healthy_cnn, 0.85,
                  higher_is_better=True, counterpart="healthy_cnn"),
    KerasScenario("keras_signal_deep_sigmoid", "pathological", "vanishing gradients: 12 sigmoid "
                  "layers", ("vanishing_gradient",), "held-out accuracy > 0.5", build_deep_sigmoid,
                  0.5, higher_is_better=True, repairable_online=False,
                  prescription="ReLU/GELU with He init, or normalisation",
                  counterpart="signal_sigmoid_vanishing"),
    KerasScenario("keras_curvature_sgd_past_limit", "pathological", "GD past the curvature limit: "
                  "SGD at 1.5 x 2/lambda_max on a regression", ("divergence", "grad_explosion",
                                                                "loss_spike"),
                  "held-out MSE < 0.05", build_sgd_past_limit, 0.05,
                  counterpart="curvature_gd_past_limit"),
    KerasScenario("keras_data_nan_batch", "pathological", "a NaN feature in one input batch",
                  ("nonfinite",), "held-out accuracy > 0.9", build_nan_batch, 0.9,
                  higher_is_better=True, onset=20, counterpart="data_nan_input"),
    KerasScenario("keras_rare_huge_batch", "pathological", "one batch with inputs x1e5 (a unit "
                  "error) under SGD+momentum", ("grad_explosion", "loss_spike", "nonfinite"),
                  "held-out accuracy > 0.9", build_rare_huge_batch, 0.9, higher_is_better=True,
                  onset=30, counterpart="adam_rare_bad_batch"),
    KerasScenario("keras_recurrent_exploding_rnn", "pathological", "exploding gradients: vanilla "
                  "ReLU RNN, recurrent gain 1.6, 30 steps", ("grad_explosion", "nonfinite",
                                                           "divergence", "loss_spike"),
                  "held-out MSE < 1.0", build_exploding_rnn, 1.0, repairable_online=False,
                  prescription="initialise the recurrent weights orthogonal with gain <= 1 (or use "
                               "an LSTM/GRU) and clip gradients: the forward pass itself explodes "
                               "from the first steps, which no online repair undoes",
                  counterpart="recurrent_exploding_rnn"),
]


def _fit(setup: dict[str, Any], guarded: bool) -> tuple[RunResult, Any]:
    import warnings

    from ..types import TrainingUnstable
    model, opt = setup["model"], setup["optimizer"]
    guard = None
    if guarded:
        from ..integrations.keras import Guard
        guard = Guard()
        opt = guard.wrap(opt)
    model.compile(optimizer=opt, loss=setup["loss"])
    t0 = time.perf_counter()
    finished, err = True, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model.fit(setup["x"], setup["y"], batch_size=setup["batch"], epochs=setup["epochs"],
                      verbose=0, shuffle=False, callbacks=[guard] if guard else [])
        except TrainingUnstable as e:
            finished, err = False, f"TrainingUnstable: {str(e).splitlines()[0]}"
        except Exception as e:  # noqa: BLE001 - a crash is an outcome
            finished, err = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    seconds = time.perf_counter() - t0
    metric = float(setup["evaluate"](model))
    return RunResult(mode="guarded" if guarded else "bare", losses=[], metric=metric,
                     seconds=seconds, finished=finished, error=err,
                     findings=list(guard.findings) if guard else [],
                     actions=list(guard.actions) if guard else []), guard


def run_one(s: KerasScenario, seed: int) -> dict[str, Any]:
    from .runner import ALARM_ACTIONS, _first_step

    def ok(r: RunResult) -> bool:
        m = r.metric
        return math.isfinite(m) and (m > s.threshold if s.higher_is_better else m < s.threshold)
    bare, _ = _fit(s.build(seed), False)
    guarded, _ = _fit(s.build(seed), True)
    severe = [f for f in guarded.findings if f.severe or f.kind in s.expected]
    first_exp = _first_step(guarded.findings, set(s.expected))
    return {
        "scenario": s.name, "category": s.category, "seed": seed, "mechanism": s.mechanism,
        "expected": list(s.expected), "source": s.source, "criterion": s.criterion,
        "repairable_online": s.repairable_online, "prescription": s.prescription,
        "onset": s.onset, "reference": s.threshold, "framework": "keras",
        "counterpart": s.counterpart,
        "bare_ok": ok(bare), "bare_metric": bare.metric, "bare_error": bare.error,
        "seconds_bare": bare.seconds,
        "guarded_ok": ok(guarded) and guarded.finished, "guarded_metric": guarded.metric,
        "guarded_error": guarded.error, "seconds_guarded": guarded.seconds,
        "findings": [f.kind for f in guarded.findings],
        "finding_steps": [f.step for f in guarded.findings],
        "first_detection_step": _first_step(severe),
        "first_expected_step": first_exp,
        "actions": [a.kind for a in guarded.actions],
        "action_steps": [a.step for a in guarded.actions],
        "detected": bool(severe),
        "named": any(f.kind in s.expected for f in guarded.findings),
        "false_alarm": (s.category == "healthy"
                        and (any(f.severe for f in guarded.findings)
                             or any(a.kind in ALARM_ACTIONS for a in guarded.actions))),
        "detection_delay": None if first_exp is None else first_exp - s.onset,
        "baselines": {},
    }


def select(only: list[str] | None) -> list[KerasScenario]:
    if not only:
        return list(SCENARIOS)
    chosen = [s for s in SCENARIOS if any(s.name == o or s.name.startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"no Keras scenario matches {only}; known: "
                         f"{', '.join(s.name for s in SCENARIOS)}")
    return chosen
