"""What one read of the weights (or of Adam's ``exp_avg_sq``) costs inside a training loop, before
the optimizer step and right after it wrote them: the price of ``Guard(integrity="step")``.

    python bench/read_cost.py [--width 512] [--steps 3000] [--threads 1]

The MLP of ``bench/overhead.py`` (64-W×3-10, batch 256, Adam). Each step times one
``torch._foreach_norm`` over the chosen tensors at the chosen point, rotating through the
variants step by step, and reports the median per variant. A cost that is the same before and
after the optimizer step is a memory-bandwidth cost (nothing stays in cache between the step
that wrote the weights and the next read), not one a better placement can avoid.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

VARIANTS = ("weights before step", "exp_avg_sq before step", "weights after step",
            "exp_avg_sq after step", "both before step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w = a.width
    m = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w),
                      nn.ReLU(), nn.Linear(w, 10))
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    ps = list(m.parameters())
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}

    def read(which: str) -> None:
        ts: list[torch.Tensor] = []
        if "weights" in which or "both" in which:
            ts += [p.detach() for p in ps]
        if "exp_avg_sq" in which or "both" in which:
            ts += [o.state[p]["exp_avg_sq"] for p in ps]
        t0 = time.perf_counter()
        torch.stack(torch._foreach_norm(ts, 2))
        times[which].append(time.perf_counter() - t0)

    for i in range(a.steps):
        k = VARIANTS[i % len(VARIANTS)]
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        torch.stack(torch._foreach_norm([p.grad for p in ps], 2))  # the Guard's gradient read
        if "before" in k and o.state:
            read(k)
        o.step()
        if "after" in k:
            read(k)
    mb = sum(p.numel() for p in ps) * 4 / 1e6
    print(f"MLP 64-{w}x3-10, {mb:.1f} MB of fp32 weights (and as much exp_avg_sq), "
          f"{a.threads} thread(s), median of {a.steps // len(VARIANTS)} reads each")
    for k, v in times.items():
        print(f"{k:<26}{statistics.median(v) * 1e6:8.0f} us")


if __name__ == "__main__":
    main()
