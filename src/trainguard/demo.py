"""``trainguard demo``: full-batch gradient descent past the curvature limit, bare vs guarded.

The model is the fc-tanh + MSE protocol of Cohen et al. 2021 (Edge of Stability) on
scikit-learn's bundled handwritten digits (1,000 training images, 797 held out). The learning
rate is set to ``k / lambda_max`` with lambda_max, the top Hessian eigenvalue at init, measured
by Hessian-vector-product power iteration. Gradient descent is stable only for eta < 2/lambda;
at k = 8 the loss grows ~49x per step along the top eigenvector and the bare run turns NaN
within a dozen steps. The guarded run, with two added lines, notices the exponential blow-up,
rolls back to the last good state and backs the learning rate off until it trains.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from torch import nn


def _data() -> tuple[torch.Tensor, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise SystemExit("trainguard demo needs scikit-learn for its bundled digits data: "
                         "pip install 'trainguard[zoo]'") from e
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return X[:1000], y[:1000], X[1000:], y[1000:]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                         nn.Linear(128, 10))


def run_one(guarded: bool, k: float, steps: int, seed: int, console: bool) -> dict[str, Any]:
    import trainguard as tg
    from trainguard.doctor.curvature import top_hessian_eigenvalue

    Xtr, ytr, Xte, yte = _data()
    Y = nn.functional.one_hot(ytr, 10).float()
    model = _model(seed)
    lam = top_hessian_eigenvalue(model, lambda: nn.functional.mse_loss(model(Xtr), Y))
    lr = k / lam
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    guard = tg.Guard(model, opt, console=console) if guarded else None
    losses: list[float] = []
    first_nan = None
    halted = None
    t0 = time.perf_counter()
    try:
        for t in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(Xtr), Y)
            loss.backward()
            v = float(loss.detach())
            losses.append(v)
            if not math.isfinite(v) and first_nan is None:
                first_nan = t
            if guard is not None:
                guard.step(loss)
            else:
                opt.step()
    except tg.TrainingUnstable as e:
        halted = str(e)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = model(Xte)
        acc = float((out.argmax(1) == yte).float().mean()) if torch.isfinite(out).all() else math.nan
    res = {"lambda_max": lam, "lr": lr, "losses": losses, "first_nan": first_nan, "accuracy": acc,
           "seconds": seconds, "halted": halted, "guard": guard}
    if guard is not None:
        guard.close()
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=float, default=8.0,
                   help="learning rate as a multiple of 1/lambda_max (stable below 2; default 8)")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.k <= 0:
        raise SystemExit("--steps must be >= 1 and --k > 0")
    try:
        from rich.console import Console
        from rich.table import Table
        console = Console()
        say = console.print
    except ImportError:  # pragma: no cover
        console, Table = None, None
        say = print
    say(f"trainguard demo: tanh MLP on the digits data set, full-batch GD at lr = {args.k:g}/lambda_max "
        "(stable only below 2/lambda_max)")
    say("\n[bold]bare run[/bold] (optimizer.step())" if console else "\nbare run")
    bare = run_one(False, args.k, args.steps, args.seed, console=False)
    say(f"  lambda_max = {bare['lambda_max']:.3f}, lr = {bare['lr']:.3f}; "
        + (f"loss became NaN at step {bare['first_nan']}" if bare["first_nan"] is not None
           else f"final loss {bare['losses'][-1]:.4g}"))
    say("\n[bold]guarded run[/bold] (guard.step(loss)): one line per intervention" if console
        else "\nguarded run")
    guarded = run_one(True, args.k, args.steps, args.seed, console=True)

    def fmt(x: float) -> str:
        return "NaN" if not math.isfinite(x) else f"{x:.4g}"

    marks = sorted({0, 2, 4, 8, 11, 20, 50, 100, args.steps // 2, args.steps - 1})
    marks = [m for m in marks if m < args.steps]
    rows = [(str(m), fmt(bare["losses"][m]) if m < len(bare["losses"]) else "-",
             fmt(guarded["losses"][m]) if m < len(guarded["losses"]) else "-") for m in marks]
    rows.append(("test accuracy", fmt(bare["accuracy"]), fmt(guarded["accuracy"])))
    rows.append(("seconds", f"{bare['seconds']:.2f}", f"{guarded['seconds']:.2f}"))
    if console is not None:
        table = Table(title="loss per step, side by side")
        for col in ("step", "bare", "guarded"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    else:  # pragma: no cover
        for r in rows:
            print("  ".join(f"{c:>14}" for c in r))
    g = guarded["guard"]
    if guarded["halted"]:
        say(guarded["halted"])
        return 1
    ok = (bare["first_nan"] is not None or not math.isfinite(bare["accuracy"])) and guarded["accuracy"] > 0.8
    say(f"\nbare: {'died (NaN)' if bare['first_nan'] is not None else 'finished'}; guarded: survived with "
        f"{fmt(guarded['accuracy'])} test accuracy, {len(g.findings)} findings, "
        f"{sum(a.kind != 'clip' for a in g.actions)} repairs, LR scale now {g.lr_scale:.3g}.")
    return 0 if ok else 1
