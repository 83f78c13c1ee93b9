"""Schedules whose learning rate or loss weight moves by design, trained as bare and never
reported: warm restarts (the LR jumps back up 2,200x at every restart, and the loss with it:
0.16 -> 0.24 around step 150), a cyclic LR between 1e-4 and 0.3, and a VAE whose KL weight
is annealed from 0 to 1 over its first 300 steps (the objective changes under the loss)."""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import trainguard as tg

from test_checkpointing import update  # backward, record the loss, guarded or bare step
from test_loss_changed import VAE  # an MLP VAE of digits: (reconstruction, mu, logvar)

torch.set_num_threads(1)
_X, _Y = load_digits(return_X_y=True)
X = torch.tensor(_X / 16.0, dtype=torch.float32)
Y = torch.tensor(_Y)


def _run(case: str, guarded: bool, steps: int = 600):
    torch.manual_seed(0)
    if case == "vae_kl_anneal":
        model: nn.Module = VAE()
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        sched = None
    else:
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                              nn.Linear(128, 10))
        if case == "warm_restarts":
            opt = torch.optim.Adam(model.parameters(), 3e-3)
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=150, eta_min=1e-6)
        else:
            opt = torch.optim.SGD(model.parameters(), 1e-3, momentum=0.9)
            sched = torch.optim.lr_scheduler.CyclicLR(opt, 1e-4, 0.3, step_size_up=100)
    guard = tg.Guard(model, opt, console=False) if guarded else None
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(X), (32,), generator=g)
        x = X[idx]
        if case == "vae_kl_anneal":
            rec, mu, logvar = model(x)
            kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum() / 32
            loss = F.mse_loss(rec, x, reduction="sum") / 32 + min(1.0, step / 300) * kl
        else:
            loss = F.cross_entropy(model(x), Y[idx])
        update(loss, opt, guard, losses)
        if sched is not None:
            sched.step()
    return losses, guard


@pytest.mark.parametrize("case", ["warm_restarts", "cyclic", "vae_kl_anneal"])
def test_a_schedule_that_moves_by_design_is_not_reported(case):
    bare, _ = _run(case, False)
    seen, guard = _run(case, True)
    assert guard is not None
    assert seen == bare
    assert guard.findings == [] and guard.actions == [], guard.findings
