"""What the Guard's periodic host work costs, each piece timed alone on a model with its Adam
state, one CPU thread: the parameter-cadence measurement (weights, optimizer state and running
statistics read with the gradients, every ``param_norm_every`` = 10 steps) against a plain
step's measurement, and a rollback snapshot's two halves, ``SnapshotStore.verify`` (the state is
finite and not huge) and ``take`` (the copy into the reused buffers: the steady state).

    python bench/periodic_cost.py [--repeat 15] [--src OTHER/src]
    python bench/periodic_cost.py --compare OTHER/src --runs 4   # two trees, runs alternated

Models: MLP 64-512x3-10 (8 tensors, 0.6M parameters) and 499 x (Linear(16,16), Tanh) +
Linear(16,10) (1,000 parameter tensors, 3,000 optimizer-state tensors). Medians of ``--repeat``
calls after warm-up; with ``--compare``, each tree's median over its runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

SRC = use_tree()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402
from trainguard.remedies.snapshot import SnapshotStore  # noqa: E402


def model(name: str) -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    if name == "many":
        return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(499)],
                             nn.Linear(16, 10)), 16
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)), 64


def measure(name: str, repeat: int) -> dict[str, float]:
    m, inp = model(name)
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    o.zero_grad()
    m(torch.randn(8, inp)).sum().backward()
    o.step()
    g = tg.Guard(m, o, console=False, locate=False)
    o.zero_grad()
    loss = m(torch.randn(8, inp)).square().mean()
    loss.backward()
    plain, cadence = [], []
    for i in range(repeat + 3):
        t = time.perf_counter()
        g.measure.measure(loss, 1, scaled=False, lr=None)
        t1 = time.perf_counter()
        g.measure.measure(loss, 1, scaled=False, lr=None, force_params=True)
        if i >= 3:
            plain.append(t1 - t)
            cadence.append(time.perf_counter() - t1)
    g.close()
    store = SnapshotStore(m, o, list(m.parameters()), keep=2)
    for _ in range(3):  # the first two allocate; from the third on the oldest is refilled
        store.take(0)
    take, verify = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        store.take(1)
        take.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.verify(1e15, 1e30)
        verify.append(time.perf_counter() - t)
    med = statistics.median
    return {"plain measurement": 1e3 * med(plain), "cadence measurement": 1e3 * med(cadence),
            "snapshot verify": 1e3 * med(verify), "snapshot take": 1e3 * med(take)}


MODELS = {"mlp": "MLP 64-512x3-10 (8 tensors)", "many": "1,000 tensors (499 x Linear(16,16)+Tanh)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    ap.add_argument("--compare", metavar="OTHER_SRC", help="run this tree and OTHER_SRC alternately")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--csv", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.compare:
        trees = {"this": os.path.abspath(SRC), "other": os.path.abspath(a.compare)}
        res: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
        for run in range(a.runs):
            for tree in (("this", "other") if run % 2 == 0 else ("other", "this")):
                out = subprocess.run([sys.executable, __file__, "--src", trees[tree], "--csv",
                                      "--repeat", str(a.repeat)], capture_output=True, text=True,
                                     check=True).stdout
                for line in out.splitlines():
                    key, val = line.split(",")
                    res[tree].setdefault(key, []).append(float(val))
        print(f"{a.runs} runs per tree, alternated; medians over runs (ms)")
        print(f"{'':62s}{'other':>10s}{'this':>10s}")
        for key in res["this"]:
            name, what = key.split(":")
            print(f"  {MODELS[name] + ', ' + what:60s}{statistics.median(res['other'][key]):10.2f}"
                  f"{statistics.median(res['this'][key]):10.2f}")
        print(f"  other: {trees['other']}")
        return
    for name in MODELS:
        r = measure(name, a.repeat)
        if a.csv:
            print("\n".join(f"{name}:{k},{v}" for k, v in r.items()))
        else:
            print(f"{MODELS[name]} (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    if not a.csv:
        print(f"trainguard from {SRC}")


if __name__ == "__main__":
    main()
