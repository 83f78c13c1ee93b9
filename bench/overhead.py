"""Per-step overhead of the Guard against the bare loop and peer tools, measured side by side.

    python bench/overhead.py [--rounds 15] [--block 40] [--threads 1] [--width 512] [--json PATH]

Every variant trains its own copy of the same seeded model (an MLP on a 256-sample batch,
Adam) whose bare step takes well over 5 ms on one CPU thread. Variants run in blocks of
``--block`` steps, interleaved round-robin for ``--rounds`` rounds after a warm-up, so slow
drifts of the machine hit every variant alike; each block's time is divided by the bare
block of the same round and the median ratio over rounds is reported.

Variants: the Guard at default settings (one host transfer per step), the Guard with
``sync=False``, ``torch.autograd.detect_anomaly``, ``clip_grad_norm_(max_norm=1.0)``,
per-parameter ``.item()`` norm logging (what wandb.watch-style loggers do), and ZClip when the
``zclip`` package is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import trainguard as tg  # noqa: E402


def make(width: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                      nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    return m, torch.optim.Adam(m.parameters(), lr=1e-3)


def variants(width: int) -> dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], None]]]:
    def bare():
        m, o = make(width)

        def step(x, y):
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
        return step

    def guard(**kw: Any):
        def build():
            m, o = make(width)
            g = tg.Guard(m, o, console=False, **kw)

            def step(x, y):
                o.zero_grad()
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                g.step(loss)
            return step
        return build

    def anomaly():
        m, o = make(width)

        def step(x, y):
            o.zero_grad()
            with torch.autograd.detect_anomaly():
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
            o.step()
        return step

    def clip():
        m, o = make(width)

        def step(x, y):
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
        return step

    def item_logging():
        m, o = make(width)
        log: list[float] = []

        def step(x, y):
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            for p in m.parameters():
                log.append(p.grad.norm().item())
            log.append(loss.item())
            del log[:-1000]
            o.step()
        return step

    out = {"bare": bare, "guard": guard(), "guard sync=False": guard(sync=False),
           "detect_anomaly": anomaly, "clip_grad_norm_": clip, "per-param .item()": item_logging}
    try:
        from zclip import ZClip  # type: ignore

        def zclip():
            m, o = make(width)
            z = ZClip()

            def step(x, y):
                o.zero_grad()
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                z.step(m)
                o.step()
            return step
        out["ZClip"] = zclip
    except Exception:  # noqa: BLE001 - optional peer
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(a.block, a.batch, 64, generator=gen)
    ys = torch.randint(0, 10, (a.block, a.batch), generator=gen)
    steps = {name: build() for name, build in variants(a.width).items()}
    for fn in steps.values():  # warm-up
        for i in range(10):
            fn(xs[i], ys[i])
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(a.rounds):
        order = list(steps)
        if r % 2:
            order.reverse()
        for name in order:
            fn = steps[name]
            t0 = time.perf_counter()
            for i in range(a.block):
                fn(xs[i], ys[i])
            times[name].append(time.perf_counter() - t0)
    bare = times["bare"]
    ms = statistics.median(bare) / a.block * 1e3
    print(f"model: MLP 64-{a.width}x3-10, batch {a.batch}, Adam, {a.threads} thread(s); "
          f"bare step {ms:.2f} ms (median); {a.rounds} interleaved rounds of {a.block} steps")
    print(f"{'variant':<22}{'ms/step':>10}{'ratio to bare (median)':>26}")
    result = {"bare_ms": ms, "ratios": {}}
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, bare))
        result["ratios"][name] = ratio
        print(f"{name:<22}{statistics.median(ts) / a.block * 1e3:>10.2f}{ratio:>26.3f}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
