"""Keras cases run by tests/test_keras.py under each backend (KERAS_BACKEND set by the caller).

    python tests/keras_cases/cases.py NAME     # prints one JSON line
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import keras  # noqa: E402
from keras import ops  # noqa: E402

import trainguard as tg  # noqa: E402
from trainguard.integrations.keras import Guard  # noqa: E402


def data(n=512, nan_at=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x[:, :2].sum(1, keepdims=True) * 0.5).astype("float32")
    if nan_at is not None:
        x[nan_at, 0] = np.nan
    return x, y


def mlp(act="tanh", depth=2, width=16):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8,))]
    layers += [keras.layers.Dense(width, activation=act) for _ in range(depth)]
    layers += [keras.layers.Dense(1)]
    return keras.Sequential(layers)


def weights(m):
    return [np.asarray(w) for w in m.get_weights()]


def fit(guarded, lr=1e-2, nan_at=None, epochs=2, **kw):
    x, y = data(nan_at=nan_at)
    m = mlp()
    opt = keras.optimizers.Adam(lr)
    g = None
    if guarded:
        g = Guard(**kw)
        opt = g.wrap(opt)
    m.compile(optimizer=opt, loss="mse")
    try:
        m.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=False,
              callbacks=[g] if g else [])
        halted = False
    except tg.TrainingUnstable:
        halted = True
    xt, yt = data(seed=1)
    with np.errstate(all="ignore"):
        mse = float(np.mean((np.asarray(m.predict(xt, verbose=0)) - yt) ** 2))
    return m, g, mse, halted


def case_healthy_fit():
    m0, _, mse0, _ = fit(False)
    m1, g, mse1, _ = fit(True)
    same = all(np.allclose(a, b, atol=1e-5) for a, b in zip(weights(m0), weights(m1)))
    return {"findings": [f.kind for f in g.findings], "actions": [a.kind for a in g.actions],
            "same": same, "mse": [mse0, mse1]}


def case_nan_batch_fit():
    m, g, mse, halted = fit(True, nan_at=300, epochs=1)
    iters = int(ops.convert_to_numpy(m.optimizer.iterations))
    return {"skips": [a.step for a in g.actions if a.kind == "skip"], "iterations": iters,
            "finite": all(np.isfinite(w).all() for w in weights(m)), "mse": mse}


def case_lr_too_high_fit():
    m0, _, mse0, _ = fit(False, lr=3.0, epochs=4)
    m, g, mse, halted = fit(True, lr=3.0, epochs=4)
    return {"bare_mse": mse0, "mse": mse, "halted": halted,
            "findings": sorted({f.kind for f in g.findings}),
            "actions": sorted({a.kind for a in g.actions}),
            "finite": all(np.isfinite(w).all() for w in weights(m))}


def case_deep_sigmoid_fit():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((8,))] + [keras.layers.Dense(32, activation="sigmoid")
                                               for _ in range(12)] + [keras.layers.Dense(1)])
    g = Guard()
    m.compile(optimizer=g.wrap(keras.optimizers.SGD(0.05)), loss="mse")
    x, y = data()
    m.fit(x, y, batch_size=32, epochs=4, verbose=0, callbacks=[g])
    return {"findings": sorted({f.kind for f in g.findings}),
            "where": [f.where for f in g.findings if f.kind == "vanishing_gradient"][:1]}


def case_tape_loop():
    """The GradientTape-style loop: guard.apply_gradients in place of optimizer.apply_gradients."""
    backend = keras.backend.backend()
    x, y = data(nan_at=300)
    m = mlp()
    opt = keras.optimizers.Adam(1e-2)
    g = Guard(snapshot_every=5)
    applied = []
    for i in range(16):
        xb, yb = x[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)]
        if backend == "tensorflow":
            import tensorflow as tf
            with tf.GradientTape() as tape:
                rows = ops.mean(ops.square(m(xb, training=True) - yb), axis=1)
                loss = ops.mean(rows)
            grads = tape.gradient(loss, m.trainable_variables)
        else:
            import torch
            m.zero_grad()
            rows = ops.mean(ops.square(m(torch.tensor(xb), training=True) - torch.tensor(yb)),
                            axis=1)
            loss = ops.mean(rows)
            loss.backward()
            grads = [v.value.grad for v in m.trainable_variables]
        before = weights(m)
        ok = g.apply_gradients(opt, zip(grads, m.trainable_variables), loss,
                               sample_ids=np.arange(32 * i, 32 * (i + 1)), sample_losses=rows)
        changed = any(not np.array_equal(a, b) for a, b in zip(before, weights(m)))
        applied.append((ok, changed))
    iters = int(ops.convert_to_numpy(opt.iterations))
    # rollback restores weights and optimizer variables exactly
    snap_w = weights(m)
    snap_o = [np.array(ops.convert_to_numpy(v)) for v in opt.variables]
    g._snaps = [(g.core.step_count, snap_w, snap_o)]
    m.layers[0].kernel.assign(np.full(m.layers[0].kernel.shape, np.inf, dtype="float32"))
    grads2 = [ops.zeros_like(v) for v in m.trainable_variables]
    loss2 = ops.mean(ops.square(m(x[:32]) - ops.convert_to_tensor(y[:32])))  # now non-finite
    ok2 = g.apply_gradients(opt, zip(grads2, m.trainable_variables), loss2)
    exact = all(np.array_equal(a, b) for a, b in zip(snap_w, weights(m))) and all(
        np.array_equal(a, np.array(ops.convert_to_numpy(v))) for a, v in zip(snap_o, opt.variables)
        if "learning_rate" not in v.path)  # the LR variable carries the backoff that came with it
    return {"truthful": all(ok == ch for ok, ch in applied), "skips": [a.step for a in g.actions
                                                                      if a.kind == "skip"],
            "iterations": iters, "rolled_back": not ok2 and exact,
            "suspects": [list(b.suspect_ids) for b in g.bad_batches],
            "actions": [a.kind for a in g.actions]}


def case_bad_input():
    g = Guard()
    out = {}
    try:
        import torch
        g.wrap(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    except TypeError as e:
        out["wrap"] = str(e)
    except ImportError:
        out["wrap"] = "keras.optimizers.Optimizer"
    m = mlp()
    opt = keras.optimizers.SGD(0.1)
    try:
        g.apply_gradients(opt, zip([ops.zeros((3, 3))], m.trainable_variables[:1]), 1.0)
    except ValueError as e:
        out["shape"] = str(e)
    return out


class WithAux(keras.Model):
    """A model with a layer the loss never uses (built, trainable, handed to the optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = keras.layers.Dense(1)
        self.hidden = keras.layers.Dense(16, activation="tanh")
        self.out = keras.layers.Dense(1)

    def build(self, shape) -> None:
        self.aux.build(shape)
        self.hidden.build(shape)
        self.out.build((shape[0], 16))

    def call(self, x):
        return self.out(self.hidden(x))


def case_unused_layer_fit():
    """Keras leaves the unused layer out with a warning; the Guard's optimizer crashed on its
    None gradient ("None values not supported"). Now it trains, and the layer is named once in
    the no-gradient note."""
    keras.utils.set_random_seed(0)
    m = WithAux()
    m.build((None, 8))
    g = Guard()
    m.compile(optimizer=g.wrap(keras.optimizers.Adam(1e-2)), loss="mse")
    x, y = data()
    m.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[g])
    s = g.core.history[-1]
    return {"findings": [[f.kind, f.severity, f.where, f.evidence.get("cause")] for f in g.findings],
            "missing": list(s.missing_grad_modules), "modules": list(s.modules),
            "finite": all(np.isfinite(w).all() for w in weights(m)), "steps": g.core.step_count}


def case_unused_layer_tape():
    """The same model in a GradientTape loop: ``optimizer.apply_gradients`` leaves the None
    gradient out with a warning, and ``guard.apply_gradients`` refused it ("no gradient for
    ..."). Now it trains as the bare loop does, bit for bit, and names the layer once."""
    backend = keras.backend.backend()
    x, y = data()
    out = {}
    for guarded in (False, True):
        keras.utils.set_random_seed(0)
        m = WithAux()
        m.build((None, 8))
        opt = keras.optimizers.Adam(1e-2)
        g = Guard()
        for i in range(32):
            xb, yb = x[32 * (i % 16):32 * (i % 16 + 1)], y[32 * (i % 16):32 * (i % 16 + 1)]
            if backend == "tensorflow":
                import tensorflow as tf
                with tf.GradientTape() as tape:
                    loss = ops.mean(ops.square(m(xb, training=True) - yb))
                grads = tape.gradient(loss, m.trainable_variables)
            else:
                import torch
                m.zero_grad()
                loss = ops.mean(ops.square(m(torch.tensor(xb), training=True) - torch.tensor(yb)))
                loss.backward()
                grads = [v.value.grad for v in m.trainable_variables]
            if guarded:
                g.apply_gradients(opt, zip(grads, m.trainable_variables), loss)
            else:
                opt.apply_gradients(zip(grads, m.trainable_variables))
        out["guarded" if guarded else "bare"] = weights(m)
    s = g.core.history[-1]
    same = all(np.array_equal(a, b) for a, b in zip(out["bare"], out["guarded"]))
    return {"findings": [[f.kind, f.severity, f.where, f.evidence.get("cause")] for f in g.findings],
            "missing": list(s.missing_grad_modules), "modules": list(s.modules),
            "same": same, "steps": g.core.step_count, "actions": [a.kind for a in g.actions]}


def case_zoo_subset():
    """Two Keras zoo scenarios through the zoo's runner: GD past the curvature limit (repaired by
    a rollback to the snapshot taken before the optimizer existed: that rollback used to reset
    the learning-rate variable to zero with the rest, and the run stopped learning) and a NaN
    batch (one skip)."""
    from trainguard.zoo import keras_zoo
    out = {}
    for s in keras_zoo.select(["keras_curvature_sgd_past_limit", "keras_data_nan_batch"]):
        r = keras_zoo.run_one(s, 0)
        out[s.name] = {k: r[k] for k in ("bare_ok", "guarded_ok", "named", "actions")}
    return out


if __name__ == "__main__":
    names = sys.argv[1:]
    out = {n: globals()[f"case_{n}"]() for n in names}
    print(json.dumps(out, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
