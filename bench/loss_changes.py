"""Runs whose loss changes its definition mid-run, guarded with and without
``guard.loss_changed()``, beside the bare run and a control whose weights really go bad.

    python bench/loss_changes.py [--seeds 2]

Cases (digits data, CPU, about a minute in all):

- ``vae_kl_on``: a VAE whose KL term is off for 1,000 steps and then on (KL warm-up by a step);
  the loss jumps ~7x and stays.
- ``task_switch``: a 10-way classifier trained on the digits 0-4 for 700 steps, then on 5-9
  (class-incremental learning); the loss jumps from ~0.02 to ~10 (confidently wrong).
- ``weights_bad``: the control: the VAE without the KL term whose decoder weights are multiplied
  by 30 at step 1,000, a failure of the weights; the rollback must stand, with its LR cut.

For each run: the findings and actions, the ``loss_changed`` events and who raised them, the LR
scale at the end, whether the Guard halted, and the mean loss of the last 100 steps (of the
steps run, for a run that halted).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import trainguard as tg  # noqa: E402


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
        self.dec = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, lv = self.enc(x).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * lv).exp()
        return self.dec(z), mu, lv


class ChangeSteps(tg.sinks.Sink):
    """Records the steps of the ``loss_changed`` events."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_event(self, kind: str, step: int, data: dict) -> None:
        if kind == "loss_changed":
            self.steps.append(step)


def run(case: str, mode: str, seed: int) -> dict:
    """``mode``: "bare", "guard" (not told) or "told" (``guard.loss_changed()`` at the switch)."""
    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)
    Y = torch.tensor(d.target)
    torch.manual_seed(seed)
    if case == "task_switch":
        model: nn.Module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        steps, switch = 1500, 700
    else:
        model = VAE()
        steps, switch = 3000, 1000
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    seen = ChangeSteps()
    guard = tg.Guard(model, opt, console=False, sinks=[seen]) if mode != "bare" else None
    first, second = (Y < 5).nonzero().flatten(), (Y >= 5).nonzero().flatten()
    losses: list[float] = []
    halted = ""
    for step in range(steps):
        if step == switch and mode == "told":
            assert guard is not None
            guard.loss_changed(f"{case} at step {switch}")
        if step == switch and case == "weights_bad":
            with torch.no_grad():
                model.dec[2].weight.mul_(30.0)  # type: ignore[index,union-attr]
        opt.zero_grad()
        if case == "task_switch":
            pool = first if step < switch else second
            idx = pool[torch.randint(0, len(pool), (32,))]
            loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
        else:
            x = X[torch.randint(0, len(X), (64,))]
            r, mu, lv = model(x)
            rec = nn.functional.binary_cross_entropy_with_logits(r, x, reduction="sum") / len(x)
            kl = (-0.5 * (1 + lv - mu ** 2 - lv.exp()).sum(-1)).mean()
            beta = 1.0 if case == "vae_kl_on" and step >= switch else 0.0
            loss = rec + beta * kl
        loss.backward()
        losses.append(float(loss.detach()))
        if guard is None:
            opt.step()
            continue
        try:
            guard.step(loss)
        except tg.TrainingUnstable as e:
            halted = f"halted at step {step}"
            del e
            break
    out = {"case": case, "mode": mode, "seed": seed, "final": float(np.mean(losses[-100:])),
           "halted": halted}
    if guard is not None:
        out.update(findings=dict(Counter(f.kind for f in guard.findings)),
                   actions=dict(Counter(a.kind for a in guard.actions)),
                   loss_changed=seen.steps, lr_scale=guard.lr_scale)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'case':<12} {'mode':<6} seed  {'final loss':>10}  {'LR scale':>8}  "
          f"{'changed at':>10}  findings / actions")
    for case in ("vae_kl_on", "task_switch", "weights_bad"):
        for seed in range(a.seeds):
            for mode in ("bare", "guard", "told"):
                if mode == "told" and (case == "weights_bad"
                                       or not hasattr(tg.Guard, "loss_changed")):
                    continue  # (an older trainguard, for the before figures, has no such call)
                r = run(case, mode, seed)
                if mode == "bare":
                    print(f"{case:<12} {mode:<6} {seed:>4}  {r['final']:>10.4g}")
                    continue
                fa = ", ".join(f"{k} {v}" for k, v in {**r["findings"], **r["actions"]}.items())
                at = ",".join(str(t) for t in r["loss_changed"]) or "-"
                print(f"{case:<12} {mode:<6} {seed:>4}  {r['final']:>10.4g}  "
                      f"{r['lr_scale']:>8.3g}  {at:>10}  {fa or '-'}"
                      f"{'  ' + r['halted'] if r['halted'] else ''}")


if __name__ == "__main__":
    main()
