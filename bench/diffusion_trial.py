"""The Guard on a denoising diffusion model (DDPM, Ho et al. 2020): the loss is the MSE of the
noise predicted at a timestep drawn at random per sample, so it is noisy and heavy-tailed from
step to step (a batch of small timesteps is hard, a batch of large ones easy) and falls slowly.

    python bench/diffusion_trial.py [--steps 3000] [--seeds 0,1] [--lrs 1e-3,3e-2] [--data digits,roll]

Data: sklearn's digits (1,797 8x8 images scaled to [-1, 1]) or a 2-D swiss roll
(``make_swiss_roll``, the classic diffusion tutorial). Denoiser: an MLP of the noisy sample and a
sinusoidal embedding of t (SiLU, as diffusion models use), linear beta schedule 1e-4..0.02 over
T=1000, Adam, batch 128. Each run once bare and once guarded (``guard.step(loss)`` for
``optimizer.step()``) from the same seed. Printed per run: whether the two runs' losses are
identical, the mean loss of the first and last 200 steps, and the Guard's findings and actions.

    python bench/diffusion_trial.py --observe [--seeds 0,1,2,3] [--lrs 1e-2,3e-2]

    python bench/diffusion_trial.py --doctor [--seeds 0,1,2,3] [--lrs 1e-2,3e-2] [--data digits] [--src OLD/src]

``--doctor``: ``tg.doctor`` on each run's model and first 16 batches (the timestep packed as
the last input column), its trial steps' peak and the LR and warm-up it suggests, then the bare
run at the LR beside a bare run at the suggestion (linear warm-up). What the doctor's
transient blow-up rule was checked on (2026-11-29, digits, seeds 0-3): at Adam 3e-2 the trial
peaks 12-74x its first loss (before the rule: "healthy", suggested 3e-2), now a warning and
1e-2 with 2,000 warm-up steps; at 2e-2 (peaks 1.7-4.0x) seed 1 was told to raise the LR to
6e-2, where it collapses; 1e-2 and 1e-3 are left alone.

``--observe``: the bare runs only, with a monitor-only Guard (``guard.observe(loss)`` before
``optimizer.step()``: it measures and reports, never acts, so the run is the bare one); printed
per run: the last 100 steps' mean loss, each SiLU layer's share of units in the flat tail at
every activation probe where some layer holds 50% or more, and the findings. What the smooth
``dead_units`` bar (``DeadUnitsDetector.smooth_level`` = 0.9) was set from (2026-11-29, seeds
0-3): the runs whose loss sat at 1.0 (digits at 3e-2, seeds 0-2; swiss roll at 1e-2, seeds 0
and 3) had their last layer at 92-100% at the first probe after the kill (digits seed 1: 92%,
then 96%); the two that came back with the loss unharmed (swiss roll at 1e-2, seeds 1 and 2)
peaked at 71% and 87%; digits at 3e-2 seed 3 (0.73) held 52-67% in both hidden layers.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402

T = 1000


def data(name: str) -> torch.Tensor:
    if name == "digits":
        from sklearn.datasets import load_digits
        X = load_digits().data / 8.0 - 1.0
    else:
        from sklearn.datasets import make_swiss_roll
        X = make_swiss_roll(4000, noise=0.5, random_state=0)[0][:, [0, 2]] / 5.0
    return torch.tensor(X, dtype=torch.float32)


class Denoiser(nn.Module):
    def __init__(self, dim: int, width: int = 256) -> None:
        super().__init__()
        self.emb = 64
        self.net = nn.Sequential(nn.Linear(dim + self.emb, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.emb // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / half)
        a = t.float()[:, None] * freqs[None]
        return self.net(torch.cat([x, a.sin(), a.cos()], 1))


def batches(X: torch.Tensor, g: torch.Generator):
    """The run's batches: (noisy samples, timesteps, the noise to predict)."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0)
    while True:
        x0 = X[torch.randint(0, len(X), (128,), generator=g)]
        t = torch.randint(0, T, (128,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t][:, None]
        yield a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def run(name: str, seed: int, steps: int, lr: float, mode: str = "bare",
        probes: list | None = None, warmup: int = 0):
    """One run, ``mode`` ``"bare"``, ``"guarded"`` (``guard.step(loss)``) or ``"observed"`` (the
    bare run with a monitor-only Guard: ``guard.observe(loss)`` before ``optimizer.step()``; its
    sampled steps' records are appended to ``probes``); ``warmup``: steps of linear warm-up to
    ``lr``. Returns the losses and the Guard (None when bare)."""
    X = data(name)
    torch.manual_seed(seed)
    model = Denoiser(X.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
             if warmup > 0 else None)
    guard = None if mode == "bare" else tg.Guard(model, opt, console=False)
    losses = []
    for _, (xt, t, eps) in zip(range(steps), batches(X, torch.Generator().manual_seed(seed))):
        loss = nn.functional.mse_loss(model(xt, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(float(loss.detach()))
        if guard is not None and mode == "guarded":
            guard.step(loss)
        else:
            if guard is not None:  # observed
                guard.observe(loss)
                if probes is not None and guard.history[-1].activations:
                    probes.append(guard.history[-1])
            opt.step()
        if sched is not None:
            sched.step()
    return losses, guard


class Packed(nn.Module):
    """The denoiser with the timestep packed as the last input column: ``model(x)`` for the
    doctor, which calls ``loss_fn(model(x), y)``."""

    def __init__(self, inner: Denoiser) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.inner(z[:, :-1], z[:, -1].long())


def diagnose(name: str, seed: int, steps: int, lr: float) -> None:
    """``tg.doctor`` on the run's model and its first 16 batches at ``lr``, then the bare run
    at ``lr`` beside the run at the doctor's suggested LR and warm-up."""
    X = data(name)
    torch.manual_seed(seed)
    model = Packed(Denoiser(X.shape[1]))
    first = [(torch.cat([xt, t[:, None].float()], 1), eps)
             for _, (xt, t, eps) in zip(range(16), batches(X, torch.Generator().manual_seed(seed)))]
    rep = tg.doctor(model, nn.functional.mse_loss, first,
                    torch.optim.Adam(model.parameters(), lr=lr), precision=False, noise=False,
                    progress=False)
    trial = rep.trial_losses
    k = min(200, steps)
    bare, _ = run(name, seed, steps, lr)
    line = (f"{name} lr {lr:g} seed {seed}: trial peak {max(trial) / trial[0]:.1f}x its first "
            f"loss; limit {rep.max_stable_lr:.3g}; suggested lr {rep.suggested_lr:.3g}, warmup "
            f"{rep.warmup_steps}; last {k} "
            f"steps: bare {sum(bare[-k:]) / k:.4f}")
    if rep.suggested_lr != lr or rep.warmup_steps:
        at, _ = run(name, seed, steps, rep.suggested_lr, warmup=rep.warmup_steps)
        line += f", at the suggestion {sum(at[-k:]) / k:.4f}"
    print(line)
    for f in rep.findings:
        if f.severity != "info":
            print(f"   [{f.severity}] {f.kind}: {f.message}")


def observe(name: str, seed: int, steps: int, lr: float) -> None:
    probes: list = []
    losses, guard = run(name, seed, steps, lr, "observed", probes)
    assert guard is not None
    print(f"{name} lr {lr:g} seed {seed} (bare, observed): last 100 steps {sum(losses[-100:]) / 100:.4f}")
    for s in probes:
        dead = {n: a["dead_fraction"] for n, a in (s.activations or {}).items()
                if a.get("dead_fraction") is not None}
        if dead and max(dead.values()) >= 0.5:
            print(f"   step {s.step}: " + ", ".join(f"{n} {v:.0%}" for n, v in dead.items()))
    for f in guard.findings:
        print(f"   finding {f.kind} at {f.step} ({f.severity}): {f.message}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lrs", default="1e-3,3e-2")
    ap.add_argument("--data", default="digits,roll")
    ap.add_argument("--observe", action="store_true", help="bare runs, monitor-only Guard")
    ap.add_argument("--src", default=None, help="run another tree's trainguard (its src/)")
    ap.add_argument("--doctor", action="store_true",
                    help="the doctor's verdict, then bare runs at the LR and at its suggestion")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for name in a.data.split(","):
        for lr in (float(v) for v in a.lrs.split(",")):
            for seed in (int(v) for v in a.seeds.split(",")):
                if a.observe or a.doctor:
                    (observe if a.observe else diagnose)(name, seed, a.steps, lr)
                    continue
                bare, _ = run(name, seed, a.steps, lr)
                seen, guard = run(name, seed, a.steps, lr, "guarded")
                assert guard is not None
                k = min(200, a.steps)
                mean = lambda v: sum(v) / len(v)  # noqa: E731
                print(f"{name} lr {lr:g} seed {seed}: identical {bare == seen}; bare "
                      f"{mean(bare[:k]):.4f} -> {mean(bare[-k:]):.4f}, guarded "
                      f"{mean(seen[:k]):.4f} -> {mean(seen[-k:]):.4f}")
                for f in guard.findings:
                    print(f"   finding {f.kind} at {f.step} ({f.severity}): {f.message}")
                acts: dict[str, list[int]] = {}
                for act in guard.actions:
                    acts.setdefault(act.kind, []).append(act.step)
                for kind, at in acts.items():
                    print(f"   action {kind} x{len(at)}: steps {at[:8]}{' ...' if len(at) > 8 else ''}")


if __name__ == "__main__":
    main()
