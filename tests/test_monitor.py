"""The NumPy Monitor (issue #11, item 2): linear regression by full-batch and mini-batch
gradient descent, a PyTorch loop that updates parameters by hand, no torch needed."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import trainguard as tg


def regression(n=100, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    w_true = np.array([[1.5], [-2.0], [0.5]])
    y = X @ w_true + 0.3 + 0.1 * rng.normal(size=(n, 1))
    return X, y


def lam_max(X):
    return float(np.linalg.eigvalsh(2.0 / len(X) * X.T @ X).max())


def fit(lr, steps=200, batch=None, seed=0, **mon_kw):
    X, y = regression(seed=seed)
    w = np.zeros((3, 1))
    b = np.zeros((1, 1))
    mon = tg.Monitor(params={"w": w, "b": b}, **mon_kw)
    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        idx = rng.choice(len(X), batch, replace=False) if batch else slice(None)
        Xb, yb = X[idx], y[idx]
        r = Xb @ w + b - yb                         # (n, 1)
        loss = float(np.mean(r ** 2))
        gw = 2.0 / len(Xb) * Xb.T @ r               # (3, 1), like w
        gb = 2.0 * r.mean(axis=0, keepdims=True)    # (1, 1), like b (not (n, 1))
        d = mon.step(loss, grads={"w": gw, "b": gb}, lr=lr)
        if d.apply:
            w -= lr * d.lr_scale * d.clip_scale * gw
            b -= lr * d.lr_scale * d.clip_scale * gb
        losses.append(loss)
    full = float(np.mean((X @ w + b - y) ** 2))
    return mon, full, w


@pytest.mark.parametrize("batch", [None, 16])
def test_healthy_regression_is_silent_and_converges(batch):
    mon, mse, w = fit(0.01, steps=400, batch=batch)
    assert not mon.findings and not mon.actions, mon.summary()
    assert mse < 0.05
    bare = fit(0.01, steps=400, batch=batch, policy=tg.Policy.monitor_only())[1]
    assert mse == pytest.approx(bare)


@pytest.mark.parametrize("batch", [None, 16])
def test_lr_past_the_curvature_limit_is_caught_and_repaired(batch):
    X, _ = regression()
    lr = 1.6 * 2.0 / lam_max(X)  # past 2 / lambda_max: GD diverges
    bare = fit(lr, steps=150, batch=batch, policy=tg.Policy.monitor_only())
    assert not np.isfinite(bare[1]) or bare[1] > 1e3
    mon, mse, w = fit(lr, steps=150, batch=batch)
    kinds = {f.kind for f in mon.findings}
    assert kinds & {"divergence", "loss_spike", "grad_explosion"}, mon.summary()
    assert {"lr_backoff"} <= {a.kind for a in mon.actions}
    assert np.isfinite(mse) and mse < 0.05, mon.summary()


def test_nan_gradient_is_skipped_and_rollback_restores_in_place():
    w = np.ones((2, 2))
    mon = tg.Monitor(params={"w": w}, snapshot_every=5)
    for i in range(12):
        g = np.full((2, 2), 0.01)
        if i == 8:
            g[0, 0] = np.nan
        d = mon.step(1.0 - 0.01 * i, grads={"w": g}, lr=0.1)
        assert d.apply == (i != 8)
        if d.apply:
            w -= 0.1 * g
    assert [a.kind for a in mon.actions] == ["skip"] and np.isfinite(w).all()
    w[0, 0] = np.inf  # corrupted weights (a bad in-place write): rolled back in place
    d = mon.step(0.9, grads={"w": np.full((2, 2), 0.01)}, lr=0.1)
    assert d.rolled_back and not d.apply and np.isfinite(w).all()
    assert w is mon.params["w"]


def test_bad_input_is_refused_clearly():
    w = np.zeros((1, 1))
    with pytest.raises(TypeError, match="floating-point NumPy array"):
        tg.Monitor(params={"w": [1.0]})
    mon = tg.Monitor(params={"w": w})
    with pytest.raises(ValueError, match=r"shape \(100, 1\), expected \(1, 1\)"):
        mon.step(1.0, grads={"w": np.zeros((100, 1))})
    with pytest.raises(ValueError, match="missing"):
        mon.step(1.0, grads={})
    with pytest.raises(TypeError, match="scalar"):
        mon.step(np.zeros(3), grads={"w": np.zeros((1, 1))})
    with pytest.raises(ValueError, match="changed shape"):
        mon.step(1.0, grads={"w": np.zeros((1, 1))}, params={"w": np.zeros((2, 1))})


def test_rebinding_the_arrays_is_warned_once():
    w = np.zeros((3, 1))
    mon = tg.Monitor(params={"w": w})
    with pytest.warns(RuntimeWarning, match="in place"):
        for i in range(6):
            g = np.full((3, 1), 0.1)
            if mon.step(1.0, grads={"w": g}, lr=0.1).apply:
                w = w - 0.1 * g  # rebinds: the Monitor's array never moves


def test_monitor_needs_no_torch():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from trainguard import Monitor
        w = np.zeros((2, 1))
        mon = Monitor(params={"w": w})
        for i in range(30):
            d = mon.step(1.0 / (i + 1), grads={"w": np.full((2, 1), 0.1)}, lr=0.1)
            w -= 0.1 * d.lr_scale * d.clip_scale * np.full((2, 1), 0.1)
        d = mon.step(float("nan"), grads={"w": np.full((2, 1), np.nan)}, lr=0.1)
        print(d.apply, [a.kind for a in mon.actions], "torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False ['skip'] False"


def test_a_pytorch_loop_that_updates_by_hand():
    """The PyTorch examples' word-level LM updates with p.data.add_(p.grad, alpha=-lr): no
    optimizer for the Guard to wrap. The Monitor takes the tensors."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 16), nn.Tanh(), nn.Linear(16, 30))
    params = dict(model.named_parameters())
    mon = tg.Monitor(params={k: p.data for k, p in params.items()}, chance_loss=float(np.log(30)))
    lr = 0.5
    gen = torch.Generator().manual_seed(0)
    for t in range(60):
        x = torch.randint(0, 30, (32,), generator=gen)
        y = (x + 1) % 30
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if t == 40:
            params["2.weight"].grad[0, 0] = float("nan")
        d = mon.step(loss, grads={k: p.grad for k, p in params.items()}, lr=lr)
        if d.apply:
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr * d.lr_scale * d.clip_scale)
    assert [a.step for a in mon.actions if a.kind == "skip"] == [40]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert mon.history[-1].loss < mon.history[0].loss
