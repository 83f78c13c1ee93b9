"""Muon beside AdamW under one Guard, the 2025-26 recipe (``Guard(model, [muon, adamw])``).

    python bench/muon_trial.py [--steps 300] [--burst-steps 150] [--lr-mult 30]

A 4-layer, 128-wide character GPT (``bench/overhead_gpu.py``'s model) learns this repository's
README, batch 16 x 64 characters, one seed: ``torch.optim.Muon`` (lr 0.02) trains every 2-D
parameter (the embeddings too, for simplicity), AdamW (lr 3e-3) the rest (norms, biases). Runs, each from the same initial weights and batches:

1. bare, ``--steps`` steps: ``muon.step(); adamw.step()``;
2. guarded, the same: ``guard.step(loss)`` (the final losses must match: a healthy run is the
   bare run);
3. both learning rates ``--lr-mult`` times higher, ``--burst-steps`` steps, guarded and bare.

Prints the final training losses, the findings and the actions. CPU, two threads; about 5 min a
300-step run on the shared 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402
from overhead_gpu import GPT  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--burst-steps", type=int, default=150)
    ap.add_argument("--lr-mult", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    a = ap.parse_args()
    torch.set_num_threads(2)
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read() * 2
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    vocab, ctx = len(chars), 64

    def batch(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - ctx - 1, (16,), generator=g)
        return (torch.stack([data[i:i + ctx] for i in ix]),
                torch.stack([data[i + 1:i + ctx + 1] for i in ix]))

    def run(guarded: bool, mult: float, steps: int) -> tuple[float, tg.Guard | None, float]:
        torch.manual_seed(0)
        m = GPT(vocab, ctx, a.width, a.layers, 4)
        mats = [p for p in m.parameters() if p.ndim == 2]
        ids = {id(p) for p in mats}
        muon = torch.optim.Muon(mats, lr=0.02 * mult)
        adamw = torch.optim.AdamW([p for p in m.parameters() if id(p) not in ids], lr=3e-3 * mult)
        g = tg.Guard(m, [muon, adamw], console=False) if guarded else None
        gen = torch.Generator().manual_seed(1)
        t0 = time.time()
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            x, y = batch(gen)
            muon.zero_grad()
            adamw.zero_grad()
            loss = nn.functional.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            if g is not None:
                g.step(loss)
            else:
                muon.step()
                adamw.step()
        return loss.item(), g, time.time() - t0

    def show(name: str, loss: float, g: tg.Guard | None, secs: float) -> None:
        extra = ""
        if g is not None:
            extra = (f"; findings {[(f.kind, f.step, f.evidence.get('cause')) for f in g.findings][:6]}"
                     f", actions {[(x.kind, x.step) for x in g.actions][:8]}")
            g.close()
        print(f"{name:34s} final loss {loss:.4f} ({secs:.0f} s){extra}", flush=True)

    print(f"char GPT {a.layers}x{a.width}, vocab {vocab}; Muon lr 0.02 (2-D weights) + AdamW "
          "lr 3e-3 (the rest)")
    show("bare", *run(False, 1.0, a.steps))
    show("guarded", *run(True, 1.0, a.steps))
    show(f"bare, both LRs x{a.lr_mult:g}", *run(False, a.lr_mult, a.burst_steps))
    show(f"guarded, both LRs x{a.lr_mult:g}", *run(True, a.lr_mult, a.burst_steps))


if __name__ == "__main__":
    main()
