"""Z4, "killed during training" - three oversized SGD steps kill the ReLU units of a net
that was training well (research/mechanisms.md 2.5 and Z4; cs231n's dying-ReLU note: "a large
gradient flowing through a ReLU neuron could cause the weights to update in such a way that
the neuron will never activate on any datapoint again").

Setup: digits with pixels in [0, 1] (not standardised, so every input is non-negative) and a
64-64-64-10 ReLU MLP, SGD lr 0.05 momentum 0.9, batch 64, 400 steps. By step 200 the run is
healthy (batch loss ~0.1, 3-9% of the hidden units silent on the whole training set). A
buggy LR schedule (say, a warm restart whose peak was written in the wrong units) then
multiplies the LR by ``SPIKE`` = 100 for the ``SPIKE_STEPS`` = 3 updates from step
``KILL_STEP`` = 200 on. The oversized updates drive the pre-activations below zero for every
input: the dead fraction on the training set jumps to 91-95% (first hidden layer) and
83-100% (second) within ten steps and stays there to step 400 (94-98% / 91-100%); a dead
unit gets no gradient, so nothing revives it, and the net falls back to (near) the constant
predictor.

Criterion: held-out cross-entropy < 0.5 after 400 steps (chance ln 10 = 2.30).
Calibration (seeds 0-4, one thread, ~0.1 s a run bare, ~0.3 s guarded): bare 1.555 / 2.311 /
1.744 / 2.306 / 2.305; the schedule fixed (``spike=1``) 0.110-0.148; a 10x spike
(``spike=10``) survives, 0.120-0.208. Neither a lower base LR (lr 0.01 with the 100x
spike: 0.95-2.27) nor LeakyReLU (slope 0.01 or 0.1: inf on all five seeds; without dead
units to stop it the same steps blow the net up) is a repair: dying is the form the
oversized step takes in a ReLU net.

Online: the kill shows at step 201 as a loss spike (38-124, 375-960x the median) and a
gradient-norm jump; skipping updates does not undo weights already damaged, a rollback to
the snapshot of step 200 plus an LR backoff does (the default Guard repairs seeds 0-4:
0.119-0.141). With ``Policy.monitor_only()`` the dead-unit detector names the kill at the
first activation probe after it (seeds 0-1, step 250: 86-92% of the first hidden layer dead).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..base import Scenario, Setup, register
from ._common_a import below, eval_ce, minibatches, mlp, seed_all
from ._common_b import digits  # pixels in [0, 1], not standardised: inputs are non-negative

THRESHOLD = 0.5
KILL_STEP = 200
SPIKE = 100.0
SPIKE_STEPS = 3
LR = 0.05


def build(seed: int, spike: float = SPIKE, act: Callable[[], nn.Module] = nn.ReLU,
          lr: float = LR) -> Setup:
    """``spike``: the LR multiplier of the buggy schedule on updates KILL_STEP ..
    KILL_STEP + SPIKE_STEPS - 1 (1.0: the schedule fixed). The schedule is a LambdaLR stepped
    once per applied update, so updates the Guard skips do not use up the spike."""
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = mlp([64, 64, 64, 10], act)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def factor(k: int) -> float:
        return spike if KILL_STEP <= k < KILL_STEP + SPIKE_STEPS else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 64, seed),
                 loss_fn=nn.functional.cross_entropy, steps=400, evaluate=eval_ce(xte, yte),
                 scheduler=sched)


register(Scenario(
    name="signal_dying_relu_killed", category="pathological",
    mechanism=f"dying ReLU, killed during training: a buggy schedule multiplies the LR by "
              f"{SPIKE:g} for {SPIKE_STEPS} steps at step {KILL_STEP}; the oversized updates "
              "leave 90-100% of the hidden ReLU units dead on every input for good",
    expected=("dead_units", "loss_spike", "grad_explosion"),
    source="Lu et al. 2019 (arXiv 1903.06733); cs231n notes on dying ReLUs; "
           "research/mechanisms.md 2.5 and Z4 (variant 'killed during training')",
    criterion=f"held-out cross-entropy < {THRESHOLD} after 400 steps (chance 2.30)",
    build=build, passed=below(THRESHOLD), repairable_online=True,
    prescription="fix the LR schedule (no update far beyond the stable LR; warm up after a "
                 "restart) or bound each update (gradient clipping); roll back to weights "
                 "from before the kill. LeakyReLU alone is no cure: the same steps diverge",
    fast=True, onset=KILL_STEP, reference=THRESHOLD))
