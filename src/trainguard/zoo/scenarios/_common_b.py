"""Shared pieces for the part-B zoo scenarios (Adam, Transformer, precision, data).

Data sets are bundled or synthetic (no downloads): scikit-learn's ``load_digits`` and
character-level text taken from the source of a standard-library module.
"""
from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..base import RunResult


def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


@lru_cache(maxsize=1)
def _digits_np() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def digits(split_seed: int = 0, n_test: int = 397) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); pixels scaled to [0, 1]; fixed split."""
    x, y = _digits_np()
    perm = np.random.RandomState(split_seed).permutation(len(x))
    x, y = torch.from_numpy(x[perm]), torch.from_numpy(y[perm])
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def minibatches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int,
                transform: Callable[[int, torch.Tensor, torch.Tensor], tuple] | None = None
                ) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """An endless, seeded stream of shuffled minibatches; ``transform(step, xb, yb)`` may
    corrupt chosen steps (bad batches)."""
    def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed + 1)
        step = 0
        while True:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - batch + 1, batch):
                idx = perm[i:i + batch]
                xb, yb = x[idx], y[idx]
                if transform is not None:
                    xb, yb = transform(step, xb, yb)
                yield xb, yb
                step += 1
    return gen


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def eval_ce(x: torch.Tensor, y: torch.Tensor, forward: Callable | None = None) -> Callable[[nn.Module], float]:
    def ev(model: nn.Module) -> float:
        out = forward(model, x) if forward else model(x)
        v = float(nn.functional.cross_entropy(out.float(), y))
        return v if math.isfinite(v) else math.inf
    return ev


def finite_run(r: RunResult) -> bool:
    return r.finished and not r.nonfinite


# ----------------------------------------------------------------------------- text
@lru_cache(maxsize=1)
def _corpus() -> str:
    """Character text already on the machine: the source of a few stdlib modules."""
    import argparse
    import textwrap
    src = inspect.getsource(textwrap) + inspect.getsource(argparse)
    return src


@lru_cache(maxsize=4)
def char_data(max_vocab: int = 64) -> tuple[torch.Tensor, int]:
    """The corpus as a tensor of character ids (characters outside the top ``max_vocab - 1``
    mapped to one 'other' id) and the vocabulary size."""
    text = _corpus()
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    keep = sorted(counts, key=lambda c: -counts[c])[:max_vocab - 1]
    idx = {c: i for i, c in enumerate(sorted(keep))}
    other = len(idx)
    ids = torch.tensor([idx.get(c, other) for c in text], dtype=torch.long)
    return ids, other + 1


def lm_batches(ids: torch.Tensor, batch: int, seq: int, seed: int, lo: int = 0, hi: int | None = None
               ) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    hi = len(ids) - seq - 1 if hi is None else hi - seq - 1

    def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed + 1)
        while True:
            starts = torch.randint(lo, hi, (batch,), generator=g)
            xb = torch.stack([ids[s:s + seq] for s in starts.tolist()])
            yb = torch.stack([ids[s + 1:s + seq + 1] for s in starts.tolist()])
            yield xb, yb
    return gen


def lm_eval_batch(ids: torch.Tensor, lo: int, hi: int, n: int, seq: int, seed: int = 1234
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(lo, hi - seq - 1, (n,), generator=g).tolist()
    return (torch.stack([ids[s:s + seq] for s in starts]),
            torch.stack([ids[s + 1:s + seq + 1] for s in starts]))


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))
