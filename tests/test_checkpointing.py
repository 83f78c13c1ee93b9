"""Activation (gradient) checkpointing, ``torch.utils.checkpoint``: the blocks' forward runs
again inside the backward pass. A guarded run is the bare run bit for bit (dropout included:
the capture reads the RNG state, it draws nothing), a sampled step counts each activation's rows
once, and a NaN produced inside a checkpointed block is located in that block, for both the
reentrant and the non-reentrant implementation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import trainguard as tg

torch.set_num_threads(1)
V, T, B = 32, 16, 8


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))
        self.poison = False

    def forward(self, x):
        out = x + self.mlp(self.ln(x))
        return out * math.nan if self.poison else out


class Net(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.emb = nn.Embedding(V, 32)
        self.blocks = nn.ModuleList(Block(32) for _ in range(2))
        self.head = nn.Linear(32, V)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.reentrant)
        return self.head(x)


def update(loss: torch.Tensor, opt: torch.optim.Optimizer, guard: tg.Guard | None,
           losses: list) -> None:
    """One step's tail: backward, record the loss, then the guarded step (or the bare one)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    losses.append(float(loss.detach()))
    if guard is not None:
        guard.step(loss)
    else:
        opt.step()


def _run(reentrant: bool, guarded: bool, steps: int = 30, poison_at: int | None = None):
    torch.manual_seed(0)
    model = Net(reentrant)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    guard = tg.Guard(model, opt, console=False) if guarded else None
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.roll(x, 1, dims=1)
        model.blocks[1].poison = step == poison_at
        loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1), label_smoothing=0.1)
        update(loss, opt, guard, losses)
        sched.step()
    return losses, guard


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_model_trains_as_bare_and_its_nan_is_located(reentrant):
    bare, _ = _run(reentrant, False)
    seen, guard = _run(reentrant, True)
    assert guard is not None
    assert seen == bare and guard.findings == [] and guard.actions == []
    sampled = next(s for s in guard.history if s.activations)
    gelu = {k: v for k, v in sampled.activations.items() if k.endswith("mlp.1")}
    assert set(gelu) == {"blocks.0.mlp.1", "blocks.1.mlp.1"}
    assert all(v["rows"] == B * T for v in gelu.values())  # once, not once more in the backward
    _, guard = _run(reentrant, True, steps=14, poison_at=12)
    assert guard is not None
    f = guard.findings[0]
    assert (f.kind, f.step, f.where, f.origin) == ("nonfinite", 12, "blocks.1", "forward")
    assert [(a.kind, a.step) for a in guard.actions] == [("skip", 12)]
