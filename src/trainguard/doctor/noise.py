"""Gradient noise scale (McCandlish et al. 2018), research/mechanisms.md §4.1.

From k micro-batch gradients G_i of size b (B_small = b, B_big = k·b, G_big = mean G_i):

    |G|²  ≈ (B_big |G_big|² − B_small mean|G_i|²) / (B_big − B_small)
    tr Σ  ≈ (mean|G_i|² − |G_big|²) / (1/B_small − 1/B_big)
    B_simple = tr Σ / |G|²          (≈ the critical batch size B_crit)

and, with one HVP along G, the noise-free optimal step ε_max = |G|²/(GᵀHG), so the optimal
SGD step at batch B is ε_opt(B) = ε_max / (1 + B_simple/B).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ._common import Batch, LossFn, batch_size, loss_of, trainable

#: An SGD learning rate this many times above ε_opt(B) is "too high for the batch": the
#: step is dominated by gradient noise (heuristic factor 2 on McCandlish's ε_opt, the same
#: factor that separates the optimal step from the divergent one on a quadratic).
NOISE_LR_FACTOR = 2.0
#: Number of micro-batches used for the estimate.
MICRO_BATCHES = 8


@dataclass
class NoiseScale:
    b_small: int
    b_big: int
    grad_sq: float  # |G|² estimate
    trace_sigma: float  # tr Σ estimate
    b_simple: float
    eps_max: float = math.nan
    eps_opt: float = math.nan  # at the user's batch size
    batch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def micro_batches(batches: Sequence[Batch], k: int = MICRO_BATCHES) -> list[Batch]:
    """k equal-size micro-batches: the user's own batches when there are ≥2 of equal size,
    else slices of the first batch."""
    same = [b for b in batches if batch_size(b[0]) == batch_size(batches[0][0])]
    if len(same) >= 2:
        return same[:k]
    x, y = batches[0]
    n = batch_size(x)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or n < 4:
        return []
    k = min(k, n // 2)
    m = n // k
    return [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]) for i in range(k)]


def noise_scale(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch],
                device: torch.device) -> NoiseScale | None:
    mbs = micro_batches(batches)
    if len(mbs) < 2:
        return None
    params = trainable(model)
    gs: list[list[torch.Tensor]] = []
    for b in mbs:
        loss = loss_of(model, loss_fn, b, device)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        gs.append([gi.detach().double() if gi is not None else torch.zeros_like(p, dtype=torch.float64)
                   for gi, p in zip(grads, params)])
    k = len(gs)
    bs = batch_size(mbs[0][0])
    small_sq = sum(float(sum((t * t).sum() for t in g)) for g in gs) / k
    gbig: list[torch.Tensor] = []
    for i in range(len(params)):  # summed in order, as sum() did (typed: a tensor, not 0 + ...)
        acc = gs[0][i]
        for g in gs[1:]:
            acc = acc + g[i]
        gbig.append(acc / k)
    big_sq = float(sum((t * t).sum() for t in gbig))
    B_s, B_b = float(bs), float(bs * k)
    grad_sq = (B_b * big_sq - B_s * small_sq) / (B_b - B_s)
    tr = (small_sq - big_sq) / (1 / B_s - 1 / B_b)
    b_simple = tr / grad_sq if grad_sq > 0 else math.inf
    res = NoiseScale(bs, bs * k, grad_sq, tr, b_simple,
                     batch=batch_size(batches[0][0]))
    # ε_max = |G|² / GᵀHG along the large-batch gradient
    from .curvature import directional_curvature
    try:
        direction = [t.to(p.dtype) for t, p in zip(gbig, params)]
        c = directional_curvature(model, loss_fn, mbs[0], device, direction)
        # directional_curvature uses one micro-batch's Hessian; GᵀHG/|G|² = c
        if c > 0 and math.isfinite(c):
            res.eps_max = 1.0 / c
            res.eps_opt = res.eps_max / (1 + max(b_simple, 0.0) / max(res.batch, 1))
    except RuntimeError:
        pass
    return res
