"""The give-back rule against a loss whose batch noise is large next to its progress
(``DivergenceDetector.MEDIAN_NOISE``): synthetic streams, then a real Poisson-NLL regression.

    python bench/giveback_noise.py [--src OTHER/src]     # ~1 min

Synthetic: 40 seeds per noise level. A loss starts quiet at 1.0 for 20 steps (a Poisson NLL at
initialisation is exp(0) - y*0 = 1 on every batch), comes down to 0.73 over 200 steps and
wanders there for 2,800 more with a log-normal batch noise of sigma; "ruin" multiplies the
same stream by 3 from step 1,500 on. Printed: healthy streams with a give-back finding, ruins
found (at or after step 1,500) and their median delay.

Real: an MLP 20-64-64-1 learning Poisson counts (rate exp(0.3 x sum of 3 features), Adam
1e-3, batch 32, 3,000 steps) under the default Guard, seeds 0-3: the findings and actions.
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import make_regression  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402
from trainguard.detect import DivergenceDetector  # noqa: E402
from trainguard.types import StepStats  # noqa: E402


def givebacks(vals: list[float]) -> list[int]:
    d = DivergenceDetector()
    out = []
    for i, v in enumerate(vals):
        out += [f.step for f in d.update(StepStats(step=i, loss=float(v), grad_norm=1.0))
                if f.evidence.get("trigger") == "giveback"]
    return out


def synthetic() -> None:
    print("synthetic: sigma | healthy streams with a give-back | 3x ruins found | median delay")
    for sigma in (0.1, 0.2, 0.4):
        false = found = 0
        delays = []
        for seed in range(40):
            r = np.random.RandomState(seed)
            vals = np.array(list(1.0 + 0.005 * r.randn(20))
                            + list(np.linspace(1.0, 0.73, 200) * np.exp(sigma * r.randn(200)))
                            + list(0.73 * np.exp(sigma * r.randn(2800))))
            false += bool(givebacks(list(vals)))
            ruined = vals.copy()
            ruined[1500:] *= 3.0
            late = [s for s in givebacks(list(ruined)) if s >= 1500]
            if late:
                found += 1
                delays.append(late[0] - 1500)
        med = f"{statistics.median(delays):g} steps" if delays else "-"
        print(f"  {sigma:<5} | {false:>2}/40 | {found:>2}/40 | {med}")


def poisson_guarded(seed: int, steps: int = 3000) -> tuple[tg.Guard, list[float]]:
    """The Poisson-NLL regression of the module docstring under the default Guard (also
    tests/test_detect_ruin.py)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, _ = make_regression(n_samples=4000, n_features=20, n_informative=10, noise=10.0,
                           random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    counts = torch.poisson(torch.exp(x[:, :3].sum(1, keepdim=True) * 0.3), generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    guard = tg.Guard(model, opt, console=False)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        loss = F.poisson_nll_loss(model(x[idx]), counts[idx], log_input=True, full=False)
        loss.backward()
        guard.step(loss)
        losses.append(loss.item())
    guard.close()
    return guard, losses


def poisson(seed: int) -> str:
    guard, losses = poisson_guarded(seed)
    return (f"  seed {seed}: first loss {losses[0]:.3f}, last 200 {np.mean(losses[-200:]):.3f}; "
            f"findings {dict(guard.finding_counts)}; actions {dict(guard.action_counts)}; "
            f"LR scale {guard.lr_scale:.3g}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    synthetic()
    print("Poisson-NLL regression under the default Guard:")
    for s in range(4):
        print(poisson(s))
