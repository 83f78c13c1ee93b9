"""How a ReLU layer's dead fraction, read on one batch, depends on the batch's size.

    python bench/dead_rows.py [--steps 2000]

A unit counts as dead on a batch when it is silent on every row of it; units grow selective as
they train, so a small batch reads living units as dead. This trains a digits MLP (64-128-10,
SGD lr 0.05 momentum 0.9) at batch 4 (with label smoothing 0.1 and without) and at batch 16,
and prints the hidden layer's dead fraction on the whole training set and, averaged over 100
random batches, on 4, 8, 16 and 32 rows, at initialisation and at the end, with the final
accuracy. The figures behind ``DeadUnitsDetector.min_rows`` (detect/units.py).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

ROWS = (4, 8, 16, 32)


def readings(m: nn.Sequential, X: torch.Tensor, reps: int = 100) -> str:
    hidden = nn.Sequential(m[0], m[1])
    with torch.no_grad():
        whole = float((hidden(X).amax(0) <= 0).float().mean())
        parts = [f"all {whole:.2f}"]
        for n in ROWS:
            v = [float((hidden(X[torch.randint(0, len(X), (n,))]).amax(0) <= 0).float().mean())
                 for _ in range(reps)]
            parts.append(f"{n} rows {np.mean(v):.2f}")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(d.target)
    for batch, smoothing in ((4, 0.1), (4, 0.0), (16, 0.1)):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = torch.optim.SGD(m.parameters(), 0.05, momentum=0.9)
        crit = nn.CrossEntropyLoss(label_smoothing=smoothing)
        start = readings(m, X)
        for _ in range(a.steps):
            idx = torch.randint(0, len(X), (batch,))
            opt.zero_grad()
            crit(m(X[idx]), Y[idx]).backward()
            opt.step()
        acc = float((m(X).argmax(1) == Y).float().mean())
        print(f"batch {batch}, label smoothing {smoothing}: accuracy {acc:.3f}")
        print(f"  at init:       {start}")
        print(f"  at step {a.steps}: {readings(m, X)}")


if __name__ == "__main__":
    main()
