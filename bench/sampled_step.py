"""What a sampled step costs on a model with many activations, piece by piece (issue #15).

    python bench/sampled_step.py [--rounds 12]
    python bench/sampled_step.py --model gpt [--src OTHER/src]   # part 1 on a small GPT

On the 1,000-tensor model of ``bench/amortised.py`` (499 x (Linear(16,16), Tanh), batch 32,
Adam, one thread):

1. a whole guarded step with the probes armed against a plain one (two Guards in one process,
   ``sample_every=1`` against never; rounds of 3 steps, interleaved, median), and the sampled
   Guard's own pieces timed in place: the parameters' copy before the update
   (``before_update``), the update ratios and optimizer-state statistics after it
   (``after_update``, of which ``_optimizer_state``);
2. a sampled forward pass alone, looking for functional calls (spy mode + process-wide module
   hooks) and not looking (the passes between looks, ``stats.LOOK_EVERY``), against a plain
   forward;
3. the tanh statistics of 499 32x16 outputs read one by one (``stats._activation_parts``)
   against the batched read (``stats._batched_parts``).

``--model gpt``: part 1 only, on a small nanoGPT-shaped decoder (bench/overhead_gpu.py's GPT:
4 layers, width 64, vocabulary 512, context 32, batch 4, AdamW, fp32). ``--src``: import
trainguard from another tree (run once per tree to compare versions).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

_SRC = use_tree()  # this checkout's src/, or --src DIR (before the import below)
import trainguard as tg  # noqa: E402
from trainguard import stats  # noqa: E402


def build(model: str = "many") -> nn.Module:
    torch.manual_seed(0)
    if model == "gpt":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from overhead_gpu import GPT
        gpt: nn.Module = GPT(512, 32, 64, 4, 1)
        return gpt
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(499)],
                         nn.Linear(16, 10))


def timed(f: Callable[[], object], n: int = 3) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--model", choices=["many", "gpt"], default="many",
                    help="many: the 1,000-tensor MLP (default); gpt: a small decoder, part 1 only")
    ap.add_argument("--src", default=None, help="import trainguard from this src/ directory")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.model == "gpt":
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (4, 32), generator=g)
    else:
        x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    print(f"trainguard from {os.path.abspath(_SRC)}; model {a.model}")

    # 1. whole steps
    runs = {}
    for every in (1, 10**9):
        m = build(a.model)
        opt = (torch.optim.AdamW(m.parameters(), 3e-4) if a.model == "gpt"
               else torch.optim.Adam(m.parameters(), 1e-3))
        g = tg.Guard(m, opt, console=False, sample_every=every, param_norm_every=10**9,
                     snapshot_every=10**9)
        runs[every] = (m, opt, g)

    def step(m: nn.Module, opt: torch.optim.Optimizer, g: tg.Guard) -> None:
        opt.zero_grad()
        out = m(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        g.step(loss)

    # the sampled Guard's own pieces, timed in place (less noisy than whole steps here)
    pieces: dict[str, list[float]] = {"before_update": [], "after_update": [],
                                      "_optimizer_state": []}
    probe = runs[1][2].measure
    for name in pieces:
        def timed_piece(*args: object, _f: Callable = getattr(probe, name), _n: str = name) -> object:
            t0 = time.perf_counter()
            try:
                return _f(*args)
            finally:
                pieces[_n].append((time.perf_counter() - t0) * 1e3)
        setattr(probe, name, timed_piece)
    for r in runs.values():
        for _ in range(5):
            step(*r)
    for v in pieces.values():
        v.clear()
    t: dict[int, list[float]] = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, (m, opt, g) in runs.items():
            t[k].append(timed(lambda: step(m, opt, g)))  # noqa: B023 (called at once)
    sampled, plain = statistics.median(t[1]), statistics.median(t[10**9])
    print(f"guarded step: plain {plain:.1f} ms, sampled {sampled:.1f} ms (+{sampled - plain:.1f} ms)")
    print("its pieces (median ms): " + ", ".join(
        f"{k} {statistics.median(v):.2f}" for k, v in pieces.items() if v)
        + " (after_update includes _optimizer_state)")
    for r in runs.values():
        r[2].close()
    if a.model == "gpt":
        return

    # 2. a sampled forward alone
    m = build()
    s = stats.ActivationSampler(m)

    def armed(look: bool) -> None:
        s._found = look  # look for functional calls on this pass, or not
        s._passes = 1
        s.arm()
        m(x)
        s.collect()

    f: dict[str, list[float]] = {"plain": [], "looking": [], "not looking": []}
    for _ in range(a.rounds):
        f["plain"].append(timed(lambda: m(x)))
        f["looking"].append(timed(lambda: armed(True)))
        f["not looking"].append(timed(lambda: armed(False)))
    base = statistics.median(f["plain"])
    print(f"sampled forward: plain {base:.1f} ms; " + ", ".join(
        f"{k} +{statistics.median(v) - base:.1f} ms" for k, v in f.items() if k != "plain"))

    # 3. one by one against batched
    outs = [torch.randn(32, 16).tanh() for _ in range(499)]

    def one_by_one() -> None:
        for o in outs:
            stats._activation_parts("tanh", o)

    def batched() -> None:
        stats._batched_parts([(o, "tanh", []) for o in outs])

    r1 = [timed(one_by_one) for _ in range(a.rounds)]
    r2 = [timed(batched) for _ in range(a.rounds)]
    print(f"499 tanh outputs 32x16: one by one {statistics.median(r1):.1f} ms, "
          f"batched {statistics.median(r2):.1f} ms")


if __name__ == "__main__":
    main()
