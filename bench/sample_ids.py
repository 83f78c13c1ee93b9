"""What passing ``sample_ids`` / ``sample_losses`` costs a healthy step (trainguard.samples: the
references are held, never read, unless the step is judged bad).

    python bench/sample_ids.py [--steps 9000] [--model small|mlp]

One Guard trains one seeded model; consecutive steps take turns (in a shuffled order each round): ``guard.step(loss)``,
``guard.step(loss, sample_ids=idx)``, ``guard.step(loss, sample_ids=idx, sample_losses=rows)``
(every step computes per-row losses and their mean, so the three differ only in the call). The
time of each ``guard.step`` call (the optimizer's update included: the same in all three) is
taken on every step; the medians per variant and their differences are printed. Interleaving
step by step puts the three under the same machine load (this machine is shared); no figure is
asserted anywhere. Healthy steps only: the script fails if any step had a finding.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402

MODELS = {"small": (64, 32, 16), "mlp": (64, 512, 256)}  # inputs, width, batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--warmup", type=int, default=600)
    ap.add_argument("--model", choices=list(MODELS), default="small")
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inp, width, batch = MODELS[a.model]
    m = nn.Sequential(nn.Linear(inp, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                      nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, opt, console=False)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(16, batch, inp, generator=gen)
    ys = torch.randint(0, 10, (16, batch), generator=gen)
    ids = torch.arange(16 * batch).reshape(16, batch)
    names = ("guard.step(loss)", "+ sample_ids", "+ sample_ids, sample_losses")
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    order = [0, 1, 2]
    for i in range(a.steps):
        if i % 3 == 0:
            rng.shuffle(order)  # each turn in a fresh order: no variant always follows another
        k = order[i % 3]
        b = (i // 3) % 16
        opt.zero_grad(set_to_none=True)
        rows = nn.functional.cross_entropy(m(xs[b]), ys[b], reduction="none")
        loss = rows.mean()
        loss.backward()
        t = time.perf_counter_ns()
        if k == 0:
            g.step(loss)
        elif k == 1:
            g.step(loss, sample_ids=ids[b])
        else:
            g.step(loss, sample_ids=ids[b], sample_losses=rows)
        dt = (time.perf_counter_ns() - t) / 1e3
        if i >= a.warmup:
            times[names[k]].append(dt)
    assert not g.findings, [str(f) for f in g.findings]
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"MLP {inp}-{width}x3-10, batch {batch}, Adam, 1 thread; {a.steps} steps taking turns, "
          f"medians of guard.step (update included), us")
    base = med[names[0]]
    for n in names:
        print(f"  {n:32s} {med[n]:9.1f}  {med[n] - base:+7.1f}")
    g.close()


if __name__ == "__main__":
    main()
