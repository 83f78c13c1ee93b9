"""fp32 master weights for 16-bit parameters, kept by the Guard (a structural repair).

A parameter stored in bf16 or fp16 with no fp32 master copy loses every update smaller than
half an ulp of its weight (|dw| < |w| * 2^-9 in bf16: Zamirai et al. 2020, arXiv 2010.06192;
Micikevicius et al. 2018, arXiv 1710.03740 keep an fp32 master copy for exactly this reason).
:class:`MasterWeights` keeps that copy without touching the user's model: around each optimizer
step the parameter's storage is swapped for its fp32 master (its gradient cast to fp32), the
optimizer updates the master, and the result is rounded back into the 16-bit tensor the model
reads. Updates below half an ulp accumulate in the master instead of vanishing.

The optimizer state of those parameters starts over in fp32 (moments kept in 16-bit would
swamp too). A 16-bit tensor written by anyone else between steps (a rollback, a checkpoint
load, the user) is noticed by its version counter and re-seeds the master, so the two never
disagree by more than one rounding.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

LOW = (torch.float16, torch.bfloat16)


class MasterWeights:
    """fp32 master copies of an optimizer's 16-bit parameters (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.dtype in LOW]
        with torch.no_grad():
            self.master = [p.detach().float().clone() for p in self.params]
        self.versions = [p._version for p in self.params]
        for p in self.params:
            optimizer.state.pop(p, None)  # moments of the 16-bit tensor start over in fp32

    def __len__(self) -> int:
        return len(self.params)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.params)
        kinds = sorted({str(p.dtype).replace("torch.", "") for p in self.params})
        return (f"fp32 master weights for {len(self.params)} {'/'.join(kinds)} parameter tensors "
                f"({n:,} values); their optimizer state restarted in fp32")

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Around ``optimizer.step()``: the optimizer sees and updates the fp32 masters."""
        saved = []
        with torch.no_grad():
            for i, (p, m) in enumerate(zip(self.params, self.master)):
                if p._version != self.versions[i]:
                    m.copy_(p.detach())  # written since our last rounding: follow it
                low, g = p.data, p.grad
                p.data = m
                if g is not None:
                    p.grad = g.float()
                saved.append((low, g))
        try:
            yield
        finally:
            with torch.no_grad():
                for i, (p, (low, g)) in enumerate(zip(self.params, saved)):
                    m = p.data
                    self.master[i] = m
                    low.copy_(m)
                    p.data = low
                    p.grad = g
                    self.versions[i] = p._version
