"""What the Guard's periodic work costs, amortised over its cadence (issue #15).

    python bench/amortised.py [--steps 400] [--big]

One guarded run per model records every step's time; steps are grouped by what the Guard did
on them: plain steps, sampled-probe steps (activations, update ratios, optimizer-state
fractions; every ``--sample-every`` = 7 steps while measuring, for enough of them), parameter-check steps (weights, optimizer state and
buffers read; every ``param_norm_every=10``) and snapshot steps (every ``snapshot_every=100``).
The amortised cost of a kind is (median of its steps - median plain step) / its default cadence
(50, 10, 100), as a share of the median plain step; a step that did two kinds of work is
counted for neither. ``--big`` adds a 100M-parameter MLP (six 4096x4096 layers,
Adam, batch 64) on which it times one snapshot (copy + verification) against one training step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import trainguard as tg  # noqa: E402


def models() -> dict[str, tuple[nn.Module, int]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    many = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(499)],
                         nn.Linear(16, 10))
    return {"MLP 64-512x3-10, batch 256": (mlp, 64), "1,000 tensors (499 x Linear(16,16)+Tanh), batch 32": (many, 16)}


#: the cadences of the Guard's defaults, over which each kind's cost is amortised
DEFAULT_EVERY = {"sampled": 50, "params": 10, "snapshot": 100}


def run(model: nn.Module, inp: int, batch: int, steps: int, sample_every: int) -> dict[str, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = tg.Guard(model, opt, console=False, sample_every=sample_every)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, inp, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    times: dict[str, list[float]] = {"plain": [], "sampled": [], "params": [], "snapshot": []}
    for t in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        g.step(loss)
        dt = time.perf_counter() - t0
        if t < 5:
            continue  # warm-up
        flags = [k for k, on in (("snapshot", (t + 1) % g.snapshots.every == 0),
                                 ("sampled", t % g.sample_every == 0),
                                 ("params", t % g.param_norm_every == 0)) if on]
        if len(flags) > 1:
            continue  # two kinds of work on one step: counted for neither
        times[flags[0] if flags else "plain"].append(dt)
    g.close()
    plain = statistics.median(times["plain"])
    out = {"plain_ms": plain * 1e3}
    for kind, every in DEFAULT_EVERY.items():
        if times[kind]:
            extra = statistics.median(times[kind]) - plain
            out[f"{kind}_extra_ms"] = extra * 1e3
            out[f"{kind}_amortised_pct"] = 100 * extra / every / plain
    return out


def big() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)])
    n = sum(p.numel() for p in m.parameters())
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    g = tg.Guard(m, opt, console=False, locate=False)
    x = torch.randn(64, 4096)
    step_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        g.step(loss)
        step_times.append(time.perf_counter() - t0)
    snap, ver = [], []
    for _ in range(5):  # the first `snapshots` ones allocate their buffers; later ones reuse them
        t0 = time.perf_counter()
        g.snapshots.verify(1e15, 1e15)
        t1 = time.perf_counter()
        g.executor.snapshot(g.step_count)  # verification + copy, as at the cadence
        snap.append(time.perf_counter() - t1)
        ver.append(t1 - t0)
    st, sn = statistics.median(step_times[1:]), statistics.median(snap[2:])
    print(f"100M model: verification alone {statistics.median(ver[2:]):.2f} s, copy alone "
          f"{sn - statistics.median(ver[2:]):.2f} s (steady state, buffers reused)")
    held = g.snapshots.nbytes() / 2**30
    print(f"100M model: {n / 1e6:.0f}M parameters, Adam; training step {st:.2f} s; snapshot "
          f"(verify + copy) {sn:.2f} s; amortised over snapshot_every={g.snapshots.every}: "
          f"{100 * sn / g.snapshots.every / st:.2f} % of a step; {len(g.snapshots.snaps)} "
          f"snapshots held, {held:.2f} GiB")
    g.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--sample-every", type=int, default=7,
                    help="probe cadence while measuring (default 7: more sampled steps to take "
                         "the median of; the cost is amortised over the default 50)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for name, (model, inp) in models().items():
        batch = 256 if inp == 64 else 32
        r = run(model, inp, batch, a.steps if inp == 64 else max(120, a.steps // 2),
                a.sample_every)
        parts = [f"plain step {r['plain_ms']:.2f} ms"]
        for kind, label in (("sampled", "sampled probes"), ("params", "parameter checks"),
                            ("snapshot", "snapshots")):
            if f"{kind}_extra_ms" in r:
                parts.append(f"{label} +{r[f'{kind}_extra_ms']:.2f} ms each = "
                             f"{r[f'{kind}_amortised_pct']:.2f} % amortised")
        print(f"{name}: " + "; ".join(parts))
    if a.big:
        big()


if __name__ == "__main__":
    main()
