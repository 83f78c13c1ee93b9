"""The textbook loop, one example (or two) per step, guarded and bare: does the Guard leave a
healthy small-batch run alone?

    python bench/small_batch.py [--steps 6000] [--seeds 0,1,2] [--batches 1,2] [--src OLD/src]

A digits MLP (64-128-10, ReLU; features / 16, as ``load_digits`` gives them), trained on
examples drawn at random (``torch.randint``, seeded) with plain SGD (lr 0.05), momentum SGD
(lr 0.01, 0.9) and Adam (1e-3), for ``--steps`` steps per seed and batch size. Each run is
trained twice from the same seed: bare, and under a default ``tg.Guard``. Printed per run: the
severe findings by kind, the actions by kind, whether the Guard halted (and at which step),
the training-set accuracy of both, and whether the guarded weights are the bare ones bit for
bit (they are when the Guard did nothing). Converged, these runs' single-example losses span
0 (a float32 underflow) to ~5 from one step to the next: the rules that judge single steps
must not take that for a failure (detect/progress.py ``BLOWUP_NOISE``, detect/spikes.py,
``PlateauDetector._level_stalled``). ``--src OLD/src`` runs another tree's trainguard (a checkout
from before those changes) for the comparison.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
}


def train(name: str, batch: int, seed: int, steps: int, guarded: bool) -> dict:
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(d.target)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = OPTIMIZERS[name](m.parameters())
    g = tg.Guard(m, opt, console=False) if guarded else None
    gen = torch.Generator().manual_seed(seed)
    halted = None
    for t in range(steps):
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(X[idx]), Y[idx])
        loss.backward()
        if g is None:
            opt.step()
            continue
        try:
            g.step(loss)
        except tg.TrainingUnstable:
            halted = t
            break
    with torch.no_grad():
        acc = (m(X).argmax(1) == Y).float().mean().item()
    out = {"acc": acc, "params": [p.detach().clone() for p in m.parameters()], "halted": halted}
    if g is not None:
        out["findings"] = Counter(f.kind for f in g.findings if f.severe)
        out["actions"] = Counter(a.kind for a in g.actions)
        g.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--src", default=None, help="run another tree's trainguard (its src/)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    runs = acted = halts = 0
    for batch in (int(b) for b in a.batches.split(",")):
        for name in OPTIMIZERS:
            for seed in (int(s) for s in a.seeds.split(",")):
                bare = train(name, batch, seed, a.steps, guarded=False)
                g = train(name, batch, seed, a.steps, guarded=True)
                same = all(torch.equal(p, q) for p, q in zip(g["params"], bare["params"]))
                runs += 1
                acted += bool(g["actions"])
                halts += g["halted"] is not None
                print(f"batch {batch} {name:8s} seed {seed}: findings {dict(g['findings']) or '-'}"
                      f", actions {dict(g['actions']) or '-'}"
                      + (f", HALTED at step {g['halted']}" if g["halted"] is not None else "")
                      + f"; accuracy {g['acc']:.3f} (bare {bare['acc']:.3f})"
                      + ("; bit for bit bare" if same else ""), flush=True)
    print(f"{runs} runs of {a.steps} steps: the Guard acted on {acted}, halted {halts}")


if __name__ == "__main__":
    main()
