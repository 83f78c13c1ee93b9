"""Per-step cost of locate's always-on half (StepCapture) on healthy steps, next to a bare
training step and to ``torch.autograd.detect_anomaly`` (the usual NaN hunter).

A step is zero_grad, forward, loss, backward, optimizer step. Variants run interleaved
(rotating order) in blocks of ``--steps`` steps, ``--reps`` times; the figure is the median
per-step time and its ratio to bare. StepCapture is driven as the Guard drives it
(``release()`` every step); the transformer has Dropout, so its RNG state is kept too.

    python bench/locate_overhead.py [--reps 15 --steps 20]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from locate_accuracy import CNN, MLP, LSTMNet, TransformerBlock  # noqa: E402

from trainguard.locate import StepCapture  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")


def make(name: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        return MLP(), torch.randn(256, 16, generator=g)
    if name == "cnn":
        return CNN(), torch.randn(64, 1, 12, 12, generator=g)
    if name == "transformer":
        return TransformerBlock(64), torch.randn(32, 32, 8, generator=g)
    return LSTMNet(), torch.randn(32, 24, 8, generator=g)


class Runner:
    def __init__(self, variant: str, model: nn.Module, x: torch.Tensor) -> None:
        self.variant, self.model, self.x = variant, model, x
        self.y = torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(1))
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.cap = StepCapture(model) if variant == "capture" else None

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.variant == "anomaly":
            with torch.autograd.detect_anomaly(check_nan=True):
                loss = nn.functional.cross_entropy(self.model(self.x), self.y)
                loss.backward()
        else:
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
            loss.backward()
        if self.cap is not None:
            self.cap.release()
        self.opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", default="mlp,cnn,transformer,lstm")
    a = ap.parse_args()
    variants = ["bare", "capture", "anomaly"]
    print(f"torch {torch.__version__}, 1 thread, median of {a.reps} interleaved blocks of "
          f"{a.steps} steps")
    print(f"{'model':12s}{'bare ms':>9s}{'capture ms':>12s}{'anomaly ms':>12s}"
          f"{'capture/bare':>14s}{'anomaly/bare':>14s}")
    for name in a.models.split(","):
        model, x = make(name)
        runners = {v: Runner(v, copy.deepcopy(model), x) for v in variants}
        for r in runners.values():  # warm-up
            for _ in range(3):
                r.step()
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(a.reps):
            order = variants[rep % 3:] + variants[:rep % 3]
            for v in order:
                r = runners[v]
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    r.step()
                times[v].append((time.perf_counter() - t0) / a.steps * 1e3)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        print(f"{name:12s}{med['bare']:9.3f}{med['capture']:12.3f}{med['anomaly']:12.3f}"
              f"{med['capture'] / med['bare']:14.3f}{med['anomaly'] / med['bare']:14.2f}")


if __name__ == "__main__":
    main()
