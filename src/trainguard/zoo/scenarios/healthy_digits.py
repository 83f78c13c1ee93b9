"""Healthy controls on scikit-learn's digits (1,797 8x8 images, 10 classes, bundled).

Each control is an ordinary, well-configured training run: the Guard must stay silent on it
(no severe finding, no skip/rollback/lr_backoff/halt). Together they cover the optimizers and
training habits the detectors meet in practice: SGD, momentum/Nesterov, Adam, RMSprop,
exponential and plateau-driven LR schedules, weight decay with dropout, batch norm, and
small-batch noisy SGD.

Criterion for all: held-out cross-entropy below ``THRESHOLD`` = 0.35 (chance is ln 10 = 2.30;
the calibrated runs below end between 0.08 and 0.25 on seeds 0-2).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..base import Scenario, Setup, register
from ._common_a import below, digits, eval_ce, minibatches, mlp, seed_all

THRESHOLD = 0.35
SOURCE = "healthy control (research/mechanisms.md section 0: benign signals must stay quiet)"


def _build(opt_fn: Callable, *, batch: int = 32, steps: int = 600, hidden: int = 128,
           depth: int = 1, dropout: float = 0.0, batchnorm: bool = False,
           sched: Callable | None = None, sched_kind: str = "step",
           act: Callable[[], nn.Module] = nn.ReLU) -> Callable[[int], Setup]:
    def build(seed: int) -> Setup:
        seed_all(seed)
        xtr, ytr, xte, yte = digits()
        model = mlp([64] + [hidden] * depth + [10], act, dropout=dropout, batchnorm=batchnorm)
        opt = opt_fn(model.parameters())
        return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, batch, seed),
                     loss_fn=nn.functional.cross_entropy, steps=steps, evaluate=eval_ce(xte, yte),
                     scheduler=sched(opt) if sched else None, scheduler_kind=sched_kind)
    return build


def _healthy(name: str, what: str, build: Callable[[int], Setup], fast: bool = False) -> None:
    register(Scenario(
        name=name, category="healthy", mechanism=what, expected=(), source=SOURCE,
        criterion=f"held-out cross-entropy < {THRESHOLD}", build=build,
        passed=below(THRESHOLD), fast=fast, reference=THRESHOLD))


_healthy("healthy_mlp_adam", "MLP 64-128-10, Adam lr 1e-3, batch 32",
         _build(lambda p: torch.optim.Adam(p, lr=1e-3)), fast=True)
_healthy("healthy_mlp_sgd", "MLP 64-128-10, plain SGD lr 0.05, batch 32",
         _build(lambda p: torch.optim.SGD(p, lr=0.05)))
_healthy("healthy_mlp_nesterov", "MLP 64-128-128-10, SGD Nesterov momentum 0.9 lr 0.01",
         _build(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True), depth=2),
         fast=True)
_healthy("healthy_mlp_rmsprop", "MLP 64-128-10, RMSprop lr 1e-3",
         _build(lambda p: torch.optim.RMSprop(p, lr=1e-3)))
_healthy("healthy_mlp_expdecay", "MLP 64-128-10, SGD momentum lr 0.05, ExponentialLR 0.99/step",
         _build(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                sched=lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.99)))
_healthy("healthy_mlp_plateau_sched", "MLP 64-128-10, SGD momentum 0.9, ReduceLROnPlateau "
         "(patience 20, factor 0.5) on the training loss",
         _build(lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
                sched=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5,
                                                                           patience=20),
                sched_kind="plateau"))
_healthy("healthy_mlp_l2_dropout", "MLP 64-256-256-10, AdamW weight decay 1e-2, dropout 0.3",
         _build(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2), hidden=256,
                depth=2, dropout=0.3))
_healthy("healthy_mlp_batchnorm", "MLP 64-(128-BN-ReLU)x3-10, SGD momentum lr 0.05",
         _build(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), depth=3, batchnorm=True))
_healthy("healthy_mlp_tanh", "MLP 64-128-128-10 tanh, SGD momentum lr 0.02",
         _build(lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9), depth=2, act=nn.Tanh))
_healthy("healthy_noisy_small_batch", "MLP 64-128-10, plain SGD lr 0.02 at batch 2 "
         "(gradient noise, not instability)",
         _build(lambda p: torch.optim.SGD(p, lr=0.02), batch=2, steps=2000))
