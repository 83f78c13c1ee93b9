"""The Guard on metric learning, losses unlike a classifier's: a triplet margin loss (exactly 0
on every batch whose triplets are already apart) and a SimCLR-style contrastive loss (InfoNCE,
a cross-entropy over the batch's similarities, whose floor depends on the temperature).

    python bench/metric_learning_trial.py [--steps 1500] [--seeds 0] [--temps 0.1,0.5]

sklearn's digits (1,797 8x8 images), an MLP encoder, Adam 1e-3; each run once bare and once
guarded (``guard.step(loss)`` for ``optimizer.step()``), with the same seed. Printed per run:
whether the two runs' losses are identical, the first and the last losses, how many steps had a
loss of exactly 0 (triplets), and the Guard's findings and actions with their advice.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def triplet(seed: int, steps: int, guarded: bool) -> tuple[list[float], tg.Guard | None]:
    X, y = _digits()
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    guard = tg.Guard(net, opt, console=False) if guarded else None
    loss_fn = nn.TripletMarginLoss(margin=1.0)
    g = torch.Generator().manual_seed(seed)
    by_class = [torch.nonzero(y == c).squeeze(1) for c in range(10)]
    others = [torch.nonzero(y != c).squeeze(1) for c in range(10)]
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(X), (32,), generator=g)
        pos = torch.stack([by_class[int(y[k])][torch.randint(0, len(by_class[int(y[k])]), (1,), generator=g)][0]
                           for k in i])
        neg = torch.stack([others[int(y[k])][torch.randint(0, len(others[int(y[k])]), (1,), generator=g)][0]
                           for k in i])
        loss = loss_fn(net(X[i]), net(X[pos]), net(X[neg]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(float(loss.detach()))
        guard.step(loss) if guard is not None else opt.step()
    return losses, guard


def contrastive(seed: int, steps: int, guarded: bool, temp: float) -> tuple[list[float], tg.Guard | None]:
    X, _ = _digits()
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128),
                        nn.ReLU(), nn.Linear(128, 64))
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    guard = tg.Guard(enc, opt, console=False) if guarded else None
    g = torch.Generator().manual_seed(seed)

    def aug(x: torch.Tensor) -> torch.Tensor:  # noise and pixel dropout
        return (x + 0.1 * torch.randn(x.shape, generator=g)) * (torch.rand(x.shape, generator=g) > 0.2)

    n = 128
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(X), (n,), generator=g)
        z = F.normalize(enc(torch.cat([aug(X[i]), aug(X[i])])), dim=1)
        sim = (z @ z.t() / temp).fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(sim, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(float(loss.detach()))
        guard.step(loss) if guard is not None else opt.step()
    return losses, guard


def report(name: str, bare: list[float], guarded: list[float], guard: tg.Guard | None) -> None:
    assert guard is not None
    guard.close()
    same = "identical" if bare == guarded else "DIFFERENT"
    zeros = sum(v == 0 for v in guarded)
    print(f"--- {name}: losses of the bare and the guarded run {same}; first {guarded[0]:.4g}, "
          f"mean of the last 50 {sum(guarded[-50:]) / 50:.4g}; steps with a loss of exactly 0: {zeros}")
    for line in guard.summary().splitlines():
        print(f"    {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--temps", default="0.1,0.5")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for seed in [int(s) for s in a.seeds.split(",")]:
        b, _ = triplet(seed, a.steps, False)
        gl, guard = triplet(seed, a.steps, True)
        report(f"triplet margin 1.0, seed {seed}", b, gl, guard)
        for t in [float(x) for x in a.temps.split(",")]:
            b, _ = contrastive(seed, a.steps, False, t)
            gl, guard = contrastive(seed, a.steps, True, t)
            report(f"contrastive (InfoNCE), temperature {t}, seed {seed}", b, gl, guard)


if __name__ == "__main__":
    main()
