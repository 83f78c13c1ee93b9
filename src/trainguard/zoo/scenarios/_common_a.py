"""Shared pieces for the part-A zoo scenarios (healthy controls, signal propagation,
recurrent nets, curvature). Data are bundled (scikit-learn's ``load_digits``) or synthetic;
nothing is downloaded.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..base import RunResult
from ._common_b import _digits_np, seed_all  # noqa: E402,F401  (shared with part B)
from ...doctor.curvature import top_hessian_eigenvalue  # noqa: E402,F401  (one implementation)


def digits(n_test: int = 397) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 8x8 digits flattened to 64 pixels in [0, 1],
    standardised per pixel on the training split; a fixed split."""
    x, y = _digits_np()
    perm = np.random.RandomState(0).permutation(len(x))
    x, y = torch.from_numpy(x[perm]), torch.from_numpy(y[perm])
    xtr, xte = x[n_test:], x[:n_test]
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(0.1)
    return (xtr - mu) / sd, y[n_test:], (xte - mu) / sd, y[:n_test]


def minibatches(x, y, batch: int, seed: int) -> Callable[[], Iterator[tuple]]:
    """An endless, seeded stream of shuffled minibatches (``batch >= len(x)``: full batch)."""
    def gen() -> Iterator[tuple]:
        if batch >= len(x):
            while True:
                yield x, y
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - batch + 1, batch):
                idx = perm[i:i + batch]
                yield x[idx], y[idx]
    return gen


def mlp(sizes: list[int], act: Callable[[], nn.Module] = nn.ReLU, *, dropout: float = 0.0,
        batchnorm: bool = False) -> nn.Sequential:
    """Linear layers with a *separate* activation module after each hidden layer (so the
    Guard's activation probes see every layer)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def eval_ce(x, y) -> Callable[[nn.Module], float]:
    def ev(model: nn.Module) -> float:
        was = model.training
        model.eval()
        v = float(nn.functional.cross_entropy(model(x), y))
        model.train(was)
        return v if math.isfinite(v) else math.inf
    return ev


def eval_mse(x, y, forward: Callable | None = None) -> Callable[[nn.Module], float]:
    def ev(model: nn.Module) -> float:
        was = model.training
        model.eval()
        out = forward(model, x) if forward else model(x)
        v = float(nn.functional.mse_loss(out, y))
        model.train(was)
        return v if math.isfinite(v) else math.inf
    return ev


def finite_run(r: RunResult) -> bool:
    return r.finished and not r.nonfinite


def below(threshold: float) -> Callable[[RunResult], bool]:
    """Pass criterion: the run finished, stayed finite, and its metric is below ``threshold``."""
    def passed(r: RunResult) -> bool:
        return finite_run(r) and r.metric < threshold
    passed.threshold = threshold  # type: ignore[attr-defined]
    return passed
