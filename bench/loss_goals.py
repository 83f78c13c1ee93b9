"""Losses that are not (only) meant to go down, guarded as a user would: does the Guard cry wolf?

    python bench/loss_goals.py [--seeds 2] [--steps 2000] [--only gan wgan ...]

Each run trains real, seeded models on CPU (one thread) and counts the Guard's findings and
actions; a healthy run should have none (clips of heavy-tailed gradients aside):

- ``gan``: a GAN on a ring of 8 Gaussians (generator and discriminator MLPs, 64 wide, Adam
  lr 1e-3, betas (0.5, 0.999), batch 64, the non-saturating BCE losses of the PyTorch DCGAN
  example), one Guard per player, at the default ``judge_loss="auto"`` and, beside it, with
  ``judge_loss=True`` on both (the loss judged as one that should go down).
- ``wgan``: WGAN-GP on the same data (5 critic steps per generator step, gradient penalty 10
  with ``create_graph=True``, Adam lr 1e-4, betas (0.5, 0.9)): losses of both signs.
- ``entropy``: a digits MLP classifier whose loss carries an entropy bonus of weight 1 (the
  loss goes from ~0 to -1.05), SGD momentum 0.9, batch 32: the loss-spike rule's raw-value
  branch.
- ``nll``: a heteroscedastic regression trained with ``nn.GaussianNLLLoss`` (the loss goes
  negative as the variance is learnt), Adam lr 1e-3, batch 64.
- ``reinforce``: a contextual bandit (8 contexts, 4 arms, unit-noise rewards) trained with
  REINFORCE and an entropy bonus of 0.01: a surrogate loss, at the default and with
  ``judge_loss=False``.

Prints one line per run: findings by kind, actions by kind, the final losses.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import trainguard as tg  # noqa: E402


def _line(name: str, guards: dict[str, tg.Guard], losses: dict[str, list[float]]) -> None:
    parts = []
    for who, g in guards.items():
        f = Counter(x.kind for x in g.findings)
        a = Counter(x.kind for x in g.actions)
        coupled = " coupled" if g.core.coupled else ""
        parts.append(f"{who}{coupled}: findings {dict(f) or 0}, actions {dict(a) or 0}, "
                     f"loss {np.mean(losses[who][-50:]):.3f}")
        g.close()
    print(f"{name:34s} " + "; ".join(parts), flush=True)


def gan(seed: int, steps: int, wgan: bool, judge: bool | str) -> None:
    torch.manual_seed(seed)
    w = 64
    G = nn.Sequential(nn.Linear(4, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 2))
    D = nn.Sequential(nn.Linear(2, w), nn.LeakyReLU(0.2), nn.Linear(w, w), nn.LeakyReLU(0.2),
                      nn.Linear(w, 1))
    lr, betas = (1e-4, (0.5, 0.9)) if wgan else (1e-3, (0.5, 0.999))
    oG = torch.optim.Adam(G.parameters(), lr=lr, betas=betas)
    oD = torch.optim.Adam(D.parameters(), lr=lr, betas=betas)
    gG = tg.Guard(G, oG, console=False, judge_loss=judge)
    gD = tg.Guard(D, oD, console=False, judge_loss=judge)
    ring = torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)]
                         for k in range(8)]) * 2
    bce = nn.BCEWithLogitsLoss()
    lg: list[float] = []
    ld: list[float] = []
    try:
        for _ in range(steps):
            for _ in range(5 if wgan else 1):
                real = ring[torch.randint(0, 8, (64,))] + 0.05 * torch.randn(64, 2)
                fake = G(torch.randn(64, 4)).detach()
                if wgan:
                    e = torch.rand(64, 1)
                    mix = (e * real + (1 - e) * fake).requires_grad_(True)
                    gr, = torch.autograd.grad(D(mix).sum(), mix, create_graph=True)
                    loss_d = (D(fake).mean() - D(real).mean()
                              + 10 * ((gr.norm(dim=1) - 1) ** 2).mean())
                else:
                    loss_d = bce(D(real), torch.ones(64, 1)) + bce(D(fake), torch.zeros(64, 1))
                oD.zero_grad()
                loss_d.backward()
                gD.step(loss_d)
                ld.append(loss_d.item())
            fake = G(torch.randn(64, 4))
            loss_g = -D(fake).mean() if wgan else bce(D(fake), torch.ones(64, 1))
            oG.zero_grad()
            loss_g.backward()
            gG.step(loss_g)
            lg.append(loss_g.item())
    except tg.TrainingUnstable as e:
        print(f"  halted: {str(e).splitlines()[0][:110]}")
    _line(f"{'wgan-gp' if wgan else 'gan'} seed {seed} judge_loss={judge}",
          {"G": gG, "D": gD}, {"G": lg, "D": ld})


def entropy(seed: int, steps: int) -> None:
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data / 16, dtype=torch.float32)
    Y = torch.tensor(d.target)
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = tg.Guard(m, o, console=False)
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(X), (32,))
        out = m(X[i])
        p = out.softmax(-1)
        ent = -(p * p.clamp_min(1e-9).log()).sum(-1).mean()
        loss = nn.functional.cross_entropy(out, Y[i]) - ent
        o.zero_grad()
        loss.backward()
        g.step(loss)
        losses.append(loss.item())
    _line(f"entropy bonus seed {seed}", {"model": g}, {"model": losses})


def nll(seed: int, steps: int) -> None:
    torch.manual_seed(seed)
    x = torch.linspace(-3, 3, 2048).unsqueeze(1)
    y = torch.sin(2 * x) + 0.05 * torch.randn_like(x) * (1 + x.abs())
    m = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, o, console=False)
    crit = nn.GaussianNLLLoss()
    losses = []
    for _ in range(steps):
        i = torch.randint(0, 2048, (64,))
        out = m(x[i])
        loss = crit(out[:, :1], y[i], out[:, 1:].exp())
        o.zero_grad()
        loss.backward()
        g.step(loss)
        losses.append(loss.item())
    _line(f"gaussian nll seed {seed}", {"model": g}, {"model": losses})


def reinforce(seed: int, steps: int, judge: bool | str) -> None:
    torch.manual_seed(seed)
    means = torch.randn(8, 4)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    o = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = tg.Guard(m, o, console=False, judge_loss=judge)
    base = 0.0
    losses = []
    for _ in range(steps):
        c = torch.randint(0, 8, (32,))
        logits = m(nn.functional.one_hot(c, 8).float())
        dist = torch.distributions.Categorical(logits=logits)
        a = dist.sample()
        r = means[c, a] + torch.randn(32)
        adv = r - base
        base = 0.99 * base + 0.01 * r.mean().item()
        loss = -(dist.log_prob(a) * adv).mean() - 0.01 * dist.entropy().mean()
        o.zero_grad()
        loss.backward()
        g.step(loss)
        losses.append(loss.item())
    _line(f"reinforce seed {seed} judge_loss={judge}", {"model": g}, {"model": losses})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--only", nargs="*", default=["gan", "wgan", "entropy", "nll", "reinforce"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    for s in range(a.seeds):
        if "gan" in a.only:
            for judge in ("auto", True):
                gan(s, a.steps, False, judge)
        if "wgan" in a.only:
            for judge in ("auto", True):
                gan(s, a.steps // 2, True, judge)
        if "entropy" in a.only:
            entropy(s, a.steps)
        if "nll" in a.only:
            nll(s, a.steps)
        if "reinforce" in a.only:
            for judge in ("auto", False):
                reinforce(s, a.steps, judge)


if __name__ == "__main__":
    main()
