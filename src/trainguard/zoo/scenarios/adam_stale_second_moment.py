"""Z9 - Adam's stale second moment triggers loss spikes after convergence (Bai et al. 2025;
Wortsman et al. 2023, StableAdamW).

Once a full-batch run has converged, gradients shrink and Adam's second moment v decays
like beta2^t (beta2 = 0.999: by e-fold per 1000 steps) while lagging far behind g^2's fall.
The effective step lr/sqrt(v_hat) grows until the preconditioned curvature along the gradient
exceeds 2/lr; the loss then jumps by orders of magnitude in a few steps, v catches up, the loss
comes back down, and the cycle repeats (research/mechanisms.md sections 5.5, 5.6, Z9). The
StableAdamW precursor: RMS_t = sqrt(mean(g^2/v_hat)) >> 1 one to eight steps before the spike.

Setup: MLP 64-32-1 (tanh), full-batch regression of a random tanh teacher (targets
normalised to unit variance) on 256 digits images, Adam lr 3e-2, betas (0.9, 0.999), 1000 steps.
Criterion (the research note's "no loss jump > k x above its trend after convergence"): after
the loss first falls below 1e-3 of its initial value, no step's loss exceeds SPIKE = 100 times
the running minimum. The first spike is recorded before any detector can see it, so no online
remedy can pass this criterion: the fix is a setting (beta2 = 0.95 passes on seeds 0-2) or
update clipping, which the doctor prescribes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import digits, seed_all

SPIKE = 100.0
CONVERGED = 1e-3


def build(seed: int, beta2: float = 0.999, lr: float = 3e-2) -> Setup:
    seed_all(seed)
    xtr, _, _, _ = digits()
    x = xtr[:256]
    teacher = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        y = teacher(x)
        y = (y - y.mean()) / y.std()
    torch.manual_seed(seed + 100)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, beta2))

    def batches():
        while True:
            yield x, y

    def evaluate(m: nn.Module) -> float:
        return float(((m(x) - y) ** 2).mean())

    return Setup(model=model, optimizer=opt, batches=batches, loss_fn=nn.functional.mse_loss,
                 steps=1000, evaluate=evaluate)


def spikes_after_convergence(losses: list[float]) -> list[int]:
    """Steps whose loss exceeds SPIKE x the running minimum, after the loss first fell below
    CONVERGED x its initial value."""
    if not losses:
        return []
    l0, run_min, converged, out = losses[0], math.inf, False, []
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            out.append(i)
            continue
        if not converged and v < CONVERGED * l0:
            converged = True
        if converged and v > SPIKE * run_min:
            out.append(i)
        run_min = min(run_min, v)
    return out


def passed(r: RunResult) -> bool:
    conv = any(v < CONVERGED * r.losses[0] for v in r.losses) if r.losses else False
    return (r.finished and conv and math.isfinite(r.metric)
            and not spikes_after_convergence(r.losses))


register(Scenario(
    name="adam_stale_second_moment", category="pathological",
    mechanism="after convergence Adam's second moment decays (beta2 = 0.999) faster than it "
              "tracks g^2: the effective step grows until the preconditioned curvature "
              "passes 2/lr and the loss spikes, repeatedly",
    expected=("loss_spike",),
    source="Bai et al. 2025 (arXiv 2506.04805); Wortsman et al. 2023 StableAdamW (arXiv "
           "2304.13013); research/mechanisms.md sections 5.5, 5.6 and Z9",
    criterion=f"after the loss falls below {CONVERGED:g} x its initial value, no loss exceeds "
              f"{SPIKE:g} x its running minimum (1000 full-batch steps)",
    build=build, passed=passed, repairable_online=False,
    prescription="lower Adam's beta2 (0.999 -> 0.95) or use update clipping (StableAdamW: "
                 "lr / max(1, RMS(g / sqrt(v_hat))) per tensor)",
))
