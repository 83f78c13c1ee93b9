"""Structural repair vs a random-remedy baseline (AUTOTRAINER-style comparison).

    python bench/doctor_repair.py [--seeds 3] [--steps 400] [--json out.json]
    python bench/doctor_repair.py --zoo [--seeds 2] [--zoo-max-steps 500] [--json out.json]

For every structural scenario and seed: train the broken configuration (baseline), then
* ``repair``   : tg.repair — remedies in the order the diagnosis ranks them;
* ``random-1`` : one remedy drawn at random (seeded) from the same menu (REMEDY_MENU);
* ``random-k`` : random remedies from the same menu, as many trials as repair used (same
  stop-on-resolve rule), i.e. an equal-budget random search (Kim et al. ICST'23).
A run is *repaired* when the scenario's pass criterion holds for the kept model. Time is
reported relative to one training run of the scenario (AUTOTRAINER: 97 % repaired, 2.21×).
Without ``--zoo`` it runs the small cases defined here. ``--zoo`` runs the same comparison on
the zoo's structural scenarios (see :func:`zoo_cases`): registered pathological scenarios with
``repairable_online=False`` from the ``signal_*`` / ``curvature_*`` modules, each for its own
number of steps (capped by ``--zoo-max-steps``), judged by the scenario's own ``passed``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from trainguard.doctor import REMEDY_MENU, repair

torch.set_num_threads(1)
# the first optimizer construction imports torch._dynamo (~1.5 s): pay it before timing
torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


# -- data -------------------------------------------------------------------------------------
def teacher_classification(seed: int = 123, n: int = 3072, d: int = 20):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    W1 = torch.randn(d, 32, generator=g) / math.sqrt(d)
    w2 = torch.randn(32, generator=g) / math.sqrt(32)
    y = ((torch.tanh(X @ W1) @ w2) > 0).long()
    return X[:2048], y[:2048], X[2048:], y[2048:]


def teacher_regression(seed: int = 321, n: int = 3072, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    W1 = torch.randn(d, 32, generator=g) / math.sqrt(d)
    w2 = torch.randn(32, 1, generator=g) / math.sqrt(32)
    y = torch.tanh(X @ W1) @ w2
    y = y / y.std()
    return X[:2048], y[:2048], X[2048:], y[2048:]


def batches_of(X, y, bs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(8):
        perm = torch.randperm(len(X), generator=g)
        out += [(X[perm[i:i + bs]], y[perm[i:i + bs]]) for i in range(0, len(X) - bs + 1, bs)]
    return out


def mlp(din: int, width: int, depth: int, act: Callable[[], nn.Module], dout: int,
        init: Callable[[nn.Linear], None]) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = din
    for _ in range(depth):
        lin = nn.Linear(d, width)
        init(lin)
        layers += [lin, act()]
        d = width
    last = nn.Linear(d, dout)
    init(last)
    layers.append(last)
    return nn.Sequential(*layers)


def old_init(l: nn.Linear) -> None:  # pre-2010 "standard" init U[±1/√fan_in] (Glorot 2010)
    b = 1 / math.sqrt(l.in_features)
    nn.init.uniform_(l.weight, -b, b)
    nn.init.uniform_(l.bias, -b, b)


def xavier(l: nn.Linear) -> None:
    nn.init.xavier_normal_(l.weight)
    nn.init.zeros_(l.bias)


def he(l: nn.Linear) -> None:
    nn.init.kaiming_normal_(l.weight, nonlinearity="relu")
    nn.init.zeros_(l.bias)


def gauss(var: float) -> Callable[[nn.Linear], None]:
    def f(l: nn.Linear) -> None:
        nn.init.normal_(l.weight, 0.0, math.sqrt(var / l.in_features))
        nn.init.zeros_(l.bias)
    return f


class Block(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(w, w), nn.Linear(w, w), nn.ReLU()
        he(self.fc1)
        he(self.fc2)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class ResMLP(nn.Module):
    def __init__(self, din: int, w: int, blocks: int, dout: int) -> None:
        super().__init__()
        self.inp = nn.Linear(din, w)
        he(self.inp)
        self.blocks = nn.Sequential(*[Block(w) for _ in range(blocks)])
        self.out = nn.Linear(w, dout)
        he(self.out)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


@dataclass
class Case:
    name: str
    mechanism: str
    model_fn: Callable[[], nn.Module]
    optimizer_fn: Callable
    loss_fn: Callable
    data: list
    metric: Callable[[nn.Module], float]
    higher_is_better: bool
    passed: Callable[[float], bool]
    criterion: str
    #: steps for this case (None: the --steps argument)
    steps: int | None = None
    #: judge(metric, losses of the kept model) -> passed; overrides ``passed`` when set
    judge: Callable[[float, list[float]], bool] | None = None
    #: per-seed case factory (zoo): model_fn, data etc. are rebuilt for each seed
    per_seed: Callable[[int], "Case"] | None = None


def _acc(Xt, yt):
    def f(m: nn.Module) -> float:
        out = m(Xt)
        if not torch.isfinite(out).all():
            return math.nan
        return float((out.argmax(1) == yt).float().mean())
    return f


def _mse(Xt, yt):
    def f(m: nn.Module) -> float:
        v = float(((m(Xt) - yt) ** 2).mean())
        return v if math.isfinite(v) else math.nan
    return f


def _fin(pred: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and pred(v)


def cases() -> list[Case]:
    Xc, yc, Xct, yct = teacher_classification()
    Xr, yr, Xrt, yrt = teacher_regression()
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    cls_data, reg_data = batches_of(Xc, yc, 64), batches_of(Xr, yr, 64)
    acc, err = _acc(Xct, yct), _mse(Xrt, yrt)
    out = [
        Case("sigmoid_vanishing", "deep sigmoid MLP (10×128), old U[±1/√n] init (Glorot 2010, Z1)",
             lambda: mlp(20, 128, 10, nn.Sigmoid, 2, old_init), lambda p: torch.optim.SGD(p, lr=0.1),
             ce, cls_data, acc, True, _fin(lambda a: a >= 0.85), "test accuracy ≥ 0.85"),
        Case("relu30_xavier", "30-layer ReLU MLP (width 128), Xavier init (He 2015, Z2)",
             lambda: mlp(20, 128, 30, nn.ReLU, 2, xavier), lambda p: torch.optim.SGD(p, lr=0.05),
             ce, cls_data, acc, True, _fin(lambda a: a >= 0.85), "test accuracy ≥ 0.85"),
        Case("tanh_ordered", "tanh MLP depth 40 width 128, σ_w²=0.5 (ordered phase, Z3)",
             lambda: mlp(20, 128, 40, nn.Tanh, 2, gauss(0.5)), lambda p: torch.optim.SGD(p, lr=0.05),
             ce, cls_data, acc, True, _fin(lambda a: a >= 0.85), "test accuracy ≥ 0.85"),
        Case("tanh_chaotic", "tanh MLP depth 40 width 128, σ_w²=4 (chaotic phase, Z3)",
             lambda: mlp(20, 128, 40, nn.Tanh, 2, gauss(4.0)), lambda p: torch.optim.SGD(p, lr=0.05),
             ce, cls_data, acc, True, _fin(lambda a: a >= 0.85), "test accuracy ≥ 0.85"),
        Case("born_dead_narrow", "ReLU MLP width 2 depth 10, He init, fit |x| (Lu 2019, Z4)",
             lambda: mlp(1, 2, 10, nn.ReLU, 1, he), lambda p: torch.optim.Adam(p, lr=5e-3),
             mse, _abs_data(), _abs_metric(), False, _fin(lambda e: e < 0.02), "test MSE < 0.02"),
        Case("resnet_unnormalised", "residual MLP, 30 blocks width 64, He init, no norm (Z6)",
             lambda: ResMLP(16, 64, 30, 1), lambda p: torch.optim.SGD(p, lr=1e-3),
             mse, reg_data, err, False, _fin(lambda e: e < 0.5), "test MSE < 0.5 (target var 1)"),
        Case("gd_past_curvature", "tanh MLP 2×64, full-batch GD at η = 8/λ_max (Cohen 2021, Z7)",
             lambda: mlp(16, 64, 2, nn.Tanh, 1, xavier), _gd_past_limit(Xr[:512], yr[:512]),
             mse, [(Xr[:512], yr[:512])], err, False, _fin(lambda e: e < 0.5), "test MSE < 0.5"),
    ]
    return out


def _abs_data():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(512, 1, generator=g) * 2 - 1
    return batches_of(x, x.abs(), 64)


def _abs_metric():
    x = torch.linspace(-1, 1, 201).unsqueeze(1)
    return _mse(x, x.abs())


def _gd_past_limit(X, y):
    """SGD (full batch) at 4× the stability limit of the model at init (λ_max measured once)."""
    from trainguard.doctor.curvature import sharpness
    torch.manual_seed(0)
    m = mlp(16, 64, 2, nn.Tanh, 1, xavier)
    c = sharpness(m, nn.MSELoss(), (X, y), torch.device("cpu"), None, 0.0)
    lr = 8.0 / c.lambda_max
    return lambda p: torch.optim.SGD(p, lr=lr)


ZOO_MODULE_PREFIXES = ("signal_", "curvature_")


def zoo_cases(max_steps: int = 500) -> tuple[list[Case], list[tuple[str, str]]]:
    """The zoo's structural scenarios as Cases (one factory per scenario, built per seed).

    model_fn = ``scenario.build(seed).model``; optimizer_fn rebuilds an optimizer of the same
    class with ``param_groups[0]``'s hyperparameters; data = the first ``min(setup.steps,
    max_steps)`` batches of ``setup.batches()`` (repair reads at most ``steps`` batches and
    cycles them; with as many batches as steps every step sees a fresh batch, as in the zoo);
    metric = ``setup.evaluate``. Repaired = ``scenario.passed`` on a RunResult built from the
    kept model's metric and training losses. Returns (cases, skipped [(name, reason)])."""
    import inspect
    import itertools

    import trainguard.zoo.scenarios  # noqa: F401 - registers the scenarios
    from trainguard.zoo.base import REGISTRY, RunResult

    out: list[Case] = []
    skipped: list[tuple[str, str]] = []
    for sc in REGISTRY.values():
        mod = sc.build.__module__.rsplit(".", 1)[-1]
        if not (sc.category == "pathological" and not sc.repairable_online
                and mod.startswith(ZOO_MODULE_PREFIXES)):
            continue
        try:
            probe = sc.build(0)
            unsupported = [k for k in ("scheduler", "scaler", "autocast", "forward")
                           if getattr(probe, k) is not None]
            if unsupported:
                skipped.append((sc.name, f"Setup uses {', '.join(unsupported)}, which repair() "
                                         "cannot reproduce"))
                continue
            if len(probe.optimizer.param_groups) != 1:
                skipped.append((sc.name, "optimizer has several param groups"))
                continue
        except Exception as e:  # noqa: BLE001
            skipped.append((sc.name, f"build failed: {type(e).__name__}: {e}"))
            continue

        def judge(metric: float, losses: list[float], sc=sc) -> bool:
            return bool(sc.passed(RunResult(mode="repair", losses=list(losses), metric=metric,
                                            seconds=0.0, finished=True)))

        def per_seed(seed: int, sc=sc, judge=judge) -> Case:
            setup = sc.build(seed)
            opt_cls = type(setup.optimizer)
            accepted = set(inspect.signature(opt_cls.__init__).parameters) - {"self", "params"}
            hyper = {k: v for k, v in setup.optimizer.param_groups[0].items()
                     if k != "params" and k in accepted}
            n = min(setup.steps, max_steps)
            return Case(sc.name, sc.mechanism, lambda: sc.build(seed).model,
                        lambda p: opt_cls(p, **hyper), setup.loss_fn,
                        list(itertools.islice(setup.batches(), n)), setup.evaluate,
                        setup.higher_is_better, lambda v: judge(v, []), sc.criterion,
                        steps=n, judge=judge)

        out.append(Case(sc.name, sc.mechanism, None, None, None, [], None,  # type: ignore[arg-type]
                        probe.higher_is_better, lambda v, judge=judge: judge(v, []), sc.criterion,
                        steps=min(probe.steps, max_steps), judge=judge, per_seed=per_seed))
    return out, skipped


def _kept_losses(res) -> list[float]:
    """Training losses of the model repair kept ([] for the baseline, which repair does not
    record; its metric is already NaN when its loss went non-finite)."""
    for t in res.trials:
        if res.remedy and t.remedy == res.remedy and t.error is None:
            return t.losses
    return []


def _passed(case: Case, metric: float, losses: list[float]) -> bool:
    return case.judge(metric, losses) if case.judge is not None else case.passed(metric)


def run(seeds: int, steps: int, only: list[str] | None = None, zoo: bool = False,
        zoo_max_steps: int = 500) -> dict:
    rows = []
    skipped: list[tuple[str, str]] = []
    if zoo:
        all_cases, skipped = zoo_cases(zoo_max_steps)
        for name, why in skipped:
            print(f"skipped {name}: {why}", flush=True)
    else:
        all_cases = cases()
    for ci, case0 in enumerate(all_cases):
        if only and case0.name not in only:
            continue
        for seed in range(seeds):
            case = case0.per_seed(seed) if case0.per_seed is not None else case0
            # a different draw per case and seed (another stream for the zoo)
            rng = np.random.default_rng((2000 if zoo else 1000) + 97 * ci + seed)
            n_steps = case.steps or steps
            common = dict(steps=n_steps, metric=case.metric, higher_is_better=case.higher_is_better,
                          seed=seed)
            r = repair(case.model_fn, case.optimizer_fn, case.loss_fn, case.data, **common)
            k = max(1, len(r.trials))
            menu = list(REMEDY_MENU)
            r1 = repair(case.model_fn, case.optimizer_fn, case.loss_fn, case.data,
                        plan=[menu[rng.integers(len(menu))]], max_trials=1, **common)
            rk = repair(case.model_fn, case.optimizer_fn, case.loss_fn, case.data,
                        plan=list(rng.permutation(menu)[:k]), max_trials=k, **common)
            row = {"case": case.name, "seed": seed, "steps": n_steps, "baseline": r.baseline_metric,
                   "baseline_pass": _passed(case, r.baseline_metric, [])}
            for tag, res in (("repair", r), ("random1", r1), ("randomk", rk)):
                row[tag] = {"metric": res.metric, "pass": _passed(case, res.metric, _kept_losses(res)),
                            "gain": _gain(res.metric, res.baseline_metric, case.higher_is_better),
                            "time_x": res.time_ratio,
                            "trials": len(res.trials), "remedy": res.remedy, "changes": res.changes}
            rows.append(row)
            print(f"{case.name:22s} seed {seed}: baseline {r.baseline_metric:8.4g} "
                  f"| repair {r.metric:8.4g} {'PASS' if row['repair']['pass'] else 'fail'} "
                  f"({len(r.trials)} trials, {row['repair']['time_x']:.2f}×, {r.remedy}) "
                  f"| random-1 {r1.metric:8.4g} {'PASS' if row['random1']['pass'] else 'fail'} ({r1.remedy or r1.trials[0].remedy}) "
                  f"| random-k {rk.metric:8.4g} {'PASS' if row['randomk']['pass'] else 'fail'}", flush=True)
    summ = {}
    for tag in ("repair", "random1", "randomk"):
        broken = [r for r in rows if not r["baseline_pass"]]
        summ[tag] = {
            "repair_rate": float(np.mean([r[tag]["pass"] for r in broken])) if broken else math.nan,
            "mean_gain": float(np.nanmean([r[tag]["gain"] for r in rows])),
            "time_x": float(np.nanmean([r[tag]["time_x"] for r in rows])),
            "n_broken": len(broken), "n": len(rows)}
    return {"rows": rows, "summary": summ, "seeds": seeds, "steps": steps, "zoo": zoo,
            "skipped": skipped}


def _gain(m: float, b: float, higher: bool) -> float:
    """Metric gain in the good direction; a non-finite baseline counts as the worst case:
    accuracy 0.5 (chance) or the gain is measured against the first finite value (nan)."""
    if not math.isfinite(m):
        return 0.0 if not math.isfinite(b) else math.nan
    if not math.isfinite(b):
        return math.nan
    return (m - b) if higher else (b - m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--json")
    ap.add_argument("--zoo", action="store_true",
                    help="run on the zoo's structural scenarios instead of the cases defined here")
    ap.add_argument("--zoo-max-steps", type=int, default=500,
                    help="cap on a zoo scenario's own step count (with --zoo)")
    a = ap.parse_args()
    t = time.perf_counter()
    res = run(a.seeds, a.steps, a.only, zoo=a.zoo, zoo_max_steps=a.zoo_max_steps)
    print()
    print(f"{'':10s} {'repair rate':>12s} {'mean gain':>10s} {'time ×':>8s}")
    for tag, s in res["summary"].items():
        print(f"{tag:10s} {s['repair_rate']:12.0%} {s['mean_gain']:10.3g} {s['time_x']:8.2f}"
              f"   ({s['n_broken']} broken runs of {s['n']})")
    print(f"total {time.perf_counter() - t:.0f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    main()
