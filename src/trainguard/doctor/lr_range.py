"""LR range test (Smith 2017; the fastai "LR finder" variant), research/mechanisms.md §3.6.

An exponential sweep of the learning rate over ``steps`` mini-batches on a copy of the model
with a fresh copy of the optimizer; the loss is smoothed with a bias-corrected EMA and the
sweep stops at the first non-finite loss or when the smoothed loss exceeds ``DIVERGE_FACTOR``
times its minimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._common import Batch, LossFn, cycle, loss_of, set_lr

#: Divergence: smoothed loss > 4 × the minimum smoothed loss ("stops when loss exceeds ~4×
#: the best", fastai LR finder, mechanisms.md §3.6).
DIVERGE_FACTOR = 4.0
#: Divergence also when the smoothed loss, having improved by at least ``1 - IMPROVED`` = 10%
#: of its first value, climbs back above that first value: it has given back all its progress.
#: A cross-entropy ruined by a too-high LR settles near the unigram level or a few nats above
#: ln V, never at 4x its best (issue #9: a char GPT's sweep ran on to lr 2.7 and the doctor
#: suggested 0.68, 230x its working 3e-3, where training collapses). The Guard's "gives back
#: its progress" rule, in the sweep.
IMPROVED = 0.9
#: EMA factor of the smoothed loss (fastai's 0.98).
SMOOTH_BETA = 0.98
#: Sweep length: "~100 mini-batches" (§3.6).
SWEEP_STEPS = 100


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    lr_min_loss: float = math.nan
    lr_steepest: float = math.nan
    lr_diverge: float = math.nan  # nan when the sweep never diverged
    #: the smoothed loss fell below IMPROVED x its first value somewhere in the sweep (a net
    #: that cannot learn, e.g. with a dead layer, never does: its minimum is noise)
    improved: bool = False
    start_lr: float = math.nan
    end_lr: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def range_test(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn,
               batches: Sequence[Batch], device: torch.device, *, start_lr: float = 1e-7,
               end_lr: float = 10.0, steps: int = SWEEP_STEPS) -> RangeTest:
    """Run the sweep on ``model``/``opt`` (both copies owned by the caller)."""
    base = [float(g["lr"]) if not isinstance(g["lr"], torch.Tensor) else float(g["lr"].item())
            for g in opt.param_groups]
    ref = base[0] if base[0] > 0 else 1.0
    ratios = [b / ref if ref > 0 else 1.0 for b in base]
    res = RangeTest(start_lr=start_lr, end_lr=end_lr)
    mult = (end_lr / start_lr) ** (1.0 / max(1, steps - 1))
    avg, best = 0.0, math.inf
    it = cycle(list(batches))
    with np.errstate(all="ignore"):
        for i in range(steps):
            lr = start_lr * mult ** i
            set_lr(opt, [lr * r for r in ratios])
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, loss_fn, next(it), device)
            v = float(loss.detach())
            res.lrs.append(lr)
            res.losses.append(v)
            if not math.isfinite(v):
                res.smoothed.append(math.inf)
                res.lr_diverge = lr
                break
            avg = SMOOTH_BETA * avg + (1 - SMOOTH_BETA) * v
            sm = avg / (1 - SMOOTH_BETA ** (i + 1))
            res.smoothed.append(sm)
            best = min(best, sm)
            first = res.smoothed[0]
            if best < IMPROVED * first:
                res.improved = True
            if i > 5 and (sm > DIVERGE_FACTOR * best or (res.improved and sm > first)):
                res.lr_diverge = lr
                break
            loss.backward()
            ok = all(torch.isfinite(p.grad).all() for g in opt.param_groups for p in g["params"]
                     if p.grad is not None)
            if not ok:
                res.lr_diverge = lr
                break
            opt.step()
    opt.zero_grad(set_to_none=True)
    sm_arr = np.asarray(res.smoothed, dtype=float)
    lrs = np.asarray(res.lrs[:len(sm_arr)], dtype=float)
    finite = np.isfinite(sm_arr)
    if finite.any():
        i_min = int(np.nanargmin(np.where(finite, sm_arr, np.inf)))
        res.lr_min_loss = float(lrs[i_min])
        if i_min >= 2:
            d = np.gradient(sm_arr[:i_min + 1], np.log(lrs[:i_min + 1]))
            res.lr_steepest = float(lrs[int(np.argmin(d))])
    return res
