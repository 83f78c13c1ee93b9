"""``trainguard zoo``: run every scenario bare, guarded and with baseline remedies, and score.

    trainguard zoo [--only NAME ...] [--seeds N] [--json PATH] [--fast]

For each scenario x seed, in one process and side by side:

* **bare**: plain ``optimizer.step()``;
* **guarded**: ``tg.Guard(model, opt, scaler=setup.scaler, console=False, **setup.guard_kwargs)``;
* **clip1**: fixed global-norm clipping at 1.0 (``torch.nn.utils.clip_grad_norm_``; Pascanu
  et al. 2013's threshold);
* **zclip** / **autoclip**: ZClip (Kumar et al. 2025, pip ``zclip``, defaults) and AutoClip
  (Seetharaman et al. 2020, pip ``autoclip``: ``QuantileClip`` at the 10th percentile of the
  global-norm history), each only when its package is importable;
* **random**: at one random step (seeded per scenario and seed) one random remedy among skip
  the update, clip the gradient norm to 1.0, or halve the learning rate from then on.

Scores (printed after the table, written with ``--json``):

* detection recall: pathological runs with at least one severe finding (or a plateau for
  mechanisms whose expected kinds include it);
* mechanism named: pathological runs with a finding whose kind is in ``scenario.expected``;
* false-alarm rate: healthy runs with a severe finding or a skip/rollback/lr_backoff/halt;
* online repair rate: guarded runs that pass, among pathological scenarios marked
  ``repairable_online``;
* median detection delay: first expected finding's step minus ``scenario.onset``;
* overhead: median guarded/bare time ratio on healthy runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Any, Callable

import torch

from .base import REGISTRY, RunResult, Scenario, Setup, train

ALARM_ACTIONS = {"skip", "rollback", "lr_backoff", "halt"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run only these scenarios (exact names or prefixes)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per scenario (default 1)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write one JSON object per scenario x seed to PATH")
    p.add_argument("--fast", action="store_true",
                   help="only the scenarios marked fast (the test-suite subset)")
    p.add_argument("--no-baselines", action="store_true",
                   help="run bare and guarded only (skip clip1/zclip/autoclip/random)")
    p.add_argument("--markdown", metavar="PATH", default=None,
                   help="also write the table and totals as Markdown to PATH")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: stable timings on shared CPUs)")
    p.add_argument("--framework", choices=("torch", "keras"), default="torch",
                   help="torch (default): the full zoo; keras: its Keras 3 subset, run with "
                        "trainguard.integrations.keras (backend from KERAS_BACKEND)")
    p.add_argument("--structural", action="store_true",
                   help="also run every scenario guarded with Policy(structural='repair') "
                        "(structural repair inside the run) and score it")
    p.add_argument("--reports", default=None, metavar="DIR",
                   help="write the HTML run report of every guarded run there "
                        "(DIR/<scenario>-seed<k>.html, with its JSONL log)")
    p.add_argument("--device", default="cpu",
                   help="run every scenario on this device, e.g. cuda (real fp16/bf16 kernels; "
                        "default cpu)")


# ----------------------------------------------------------------------------- baselines
def _guard_factory(setup: Setup) -> Any:
    import trainguard as tg
    return tg.Guard(setup.model, setup.optimizer, scaler=setup.scaler, console=False,
                    **setup.guard_kwargs)


def _unscale(setup: Setup) -> None:
    """Under fp16 loss scaling, clip the true gradients (the scaler's documented recipe)."""
    sc = setup.scaler
    if sc is not None and getattr(sc, "is_enabled", lambda: False)():
        sc.unscale_(setup.optimizer)


def baseline_clip(setup: Setup) -> Callable[[float], bool]:
    params = [p for p in setup.model.parameters() if p.requires_grad]

    def remedy(_loss: float) -> bool:
        _unscale(setup)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return True
    return remedy


def _zclip_available() -> bool:
    try:
        import zclip  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def _autoclip_available() -> bool:
    try:
        from autoclip.torch import QuantileClip  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def baseline_zclip(setup: Setup) -> Callable[[float], bool]:
    from zclip import ZClip
    zc = ZClip()  # defaults: alpha 0.97, z_thresh 2.5, warmup 25 (Kumar et al. 2025)

    def remedy(_loss: float) -> bool:
        _unscale(setup)
        zc.step(setup.model)
        return True
    return remedy


def baseline_autoclip(setup: Setup) -> Callable[[float], bool]:
    from autoclip.torch import QuantileClip
    params = [p for p in setup.model.parameters() if p.requires_grad]
    # AutoClip (Seetharaman et al. 2020): clip the global norm to the 10th percentile of its history
    clipper = QuantileClip(params, quantile=0.1, history_length=1000, global_threshold=True)

    def remedy(_loss: float) -> bool:
        _unscale(setup)
        clipper.step()
        return True
    return remedy


def baseline_random(setup: Setup, seed: int, name: str) -> Callable[[float], bool]:
    rng = random.Random(f"{name}:{seed}")
    at = rng.randrange(max(setup.steps, 1))
    kind = rng.choice(["skip", "clip", "halve_lr"])
    params = [p for p in setup.model.parameters() if p.requires_grad]
    state = {"t": 0}

    def remedy(_loss: float) -> bool:
        t = state["t"]
        state["t"] += 1
        if t != at:
            return True
        if kind == "skip":
            return False
        if kind == "clip":
            _unscale(setup)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            return True
        for g in setup.optimizer.param_groups:
            g["lr"] = g["lr"] * 0.5
        return True
    remedy.describe = f"{kind}@{at}"  # type: ignore[attr-defined]
    return remedy


def baselines() -> dict[str, Callable[..., Callable[[float], bool]]]:
    out: dict[str, Callable] = {"clip1": baseline_clip}
    if _zclip_available():
        out["zclip"] = baseline_zclip
    if _autoclip_available():
        out["autoclip"] = baseline_autoclip
    return out


# ----------------------------------------------------------------------------- scoring
def reference_of(s: Scenario) -> float | None:
    if s.reference is not None:
        return s.reference
    ref = getattr(s.passed, "threshold", None)
    if ref is None:
        mod = sys.modules.get(getattr(s.build, "__module__", "") or "")
        ref = getattr(mod, "THRESHOLD", None)
    return float(ref) if isinstance(ref, (int, float)) else None


def _first_step(findings: list, kinds: set[str] | None = None) -> int | None:
    steps = [f.step for f in findings if kinds is None or f.kind in kinds]
    return min(steps) if steps else None


def detected(s: Scenario, r: RunResult) -> bool:
    """A pathological run counts as detected when the guard raised a severe finding, or
    any finding of an expected kind (the plateau of a structural stall is an expected
    finding, not an alarm)."""
    return any(f.severe or f.kind in s.expected for f in r.findings)


def false_alarm(r: RunResult) -> bool:
    return any(f.severe for f in r.findings) or any(a.kind in ALARM_ACTIONS for a in r.actions)


def _structural_factory(setup: Setup) -> Any:
    """The guarded run with ``Policy(structural="repair")`` (the scenario's own ladders kept)."""
    import trainguard as tg
    kw = dict(setup.guard_kwargs)
    p = kw.pop("policy", None) or tg.Policy()
    policy = tg.Policy(p.ladder, window=p.window, halt_on=p.halt_on,
                       max_rollbacks=p.max_rollbacks, lr_backoff=p.lr_backoff,
                       min_lr_scale=p.min_lr_scale, lr_cause_backoff=p.lr_cause_backoff,
                       structural="repair")
    return tg.Guard(setup.model, setup.optimizer, scaler=setup.scaler, console=False,
                    policy=policy, **kw)


def run_one(s: Scenario, seed: int, with_baselines: bool = True,
            device: str = "cpu", report_dir: str | None = None,
            structural: bool = False) -> dict[str, Any]:
    rec: dict[str, Any] = {"scenario": s.name, "category": s.category, "seed": seed,
                           "mechanism": s.mechanism, "expected": list(s.expected),
                           "source": s.source, "criterion": s.criterion,
                           "repairable_online": s.repairable_online,
                           "prescription": s.prescription, "onset": s.onset,
                           "reference": reference_of(s), "device": device}
    bare = train(s.build(seed), "bare", device=device)
    factory: Callable[[Setup], Any] = _guard_factory
    if report_dir is not None:
        path = os.path.join(report_dir, f"{s.name}-seed{seed}.html")

        def with_report(setup: Setup) -> Any:
            import trainguard as tg
            return tg.Guard(setup.model, setup.optimizer, scaler=setup.scaler, console=False,
                            report=path, **setup.guard_kwargs)
        factory = with_report
    guarded = train(s.build(seed), "guarded", guard_factory=factory, device=device)
    rec.update({
        "bare_ok": bool(s.passed(bare)), "bare_metric": bare.metric,
        "bare_error": bare.error, "seconds_bare": bare.seconds,
        "guarded_ok": bool(s.passed(guarded)), "guarded_metric": guarded.metric,
        "guarded_error": guarded.error, "seconds_guarded": guarded.seconds,
        "findings": [f.kind for f in guarded.findings],
        "finding_steps": [f.step for f in guarded.findings],
        "first_detection_step": _first_step([f for f in guarded.findings
                                             if f.severe or f.kind in s.expected]),
        "first_expected_step": _first_step(guarded.findings, set(s.expected)),
        "actions": [a.kind for a in guarded.actions],
        "action_steps": [a.step for a in guarded.actions],
        "detected": detected(s, guarded),
        "named": any(f.kind in s.expected for f in guarded.findings),
        "false_alarm": false_alarm(guarded),
    })
    d = rec["first_expected_step"]
    rec["detection_delay"] = None if d is None else d - s.onset
    if structural:
        r = train(s.build(seed), "guarded", guard_factory=_structural_factory, device=device)
        rec["structural"] = {"ok": bool(s.passed(r)), "metric": r.metric, "seconds": r.seconds,
                             "error": r.error, "false_alarm": false_alarm(r),
                             "restructures": [(a.step, a.detail.get("remedy")) for a in r.actions
                                              if a.kind == "restructure"],
                             "named": any(f.kind in s.expected for f in r.findings)}
    base: dict[str, Any] = {}
    if with_baselines:
        for name, make in baselines().items():
            st = s.build(seed)
            r = train(st, name, remedy=make(st), device=device)
            base[name] = {"ok": bool(s.passed(r)), "metric": r.metric, "seconds": r.seconds,
                          "error": r.error}
        st = s.build(seed)
        rem = baseline_random(st, seed, s.name)
        r = train(st, "random", remedy=rem, device=device)
        base["random"] = {"ok": bool(s.passed(r)), "metric": r.metric, "seconds": r.seconds,
                          "error": r.error, "remedy": getattr(rem, "describe", "")}
    rec["baselines"] = base
    return rec


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    path = [r for r in records if r["category"] == "pathological"]
    healthy = [r for r in records if r["category"] == "healthy"]
    rep = [r for r in path if r["repairable_online"]]
    delays = [r["detection_delay"] for r in path if r["detection_delay"] is not None]
    ratios = [r["seconds_guarded"] / r["seconds_bare"] for r in healthy if r["seconds_bare"] > 0]

    def rate(rs: list, key: str) -> float | None:
        return sum(bool(r[key]) for r in rs) / len(rs) if rs else None
    out: dict[str, Any] = {
        "pathological_runs": len(path), "healthy_runs": len(healthy),
        "bare_failure_rate_pathological": (sum(not r["bare_ok"] for r in path) / len(path)
                                           if path else None),
        "bare_pass_rate_healthy": rate(healthy, "bare_ok"),
        "detection_recall": rate(path, "detected"),
        "mechanism_named": rate(path, "named"),
        "false_alarm_rate": rate(healthy, "false_alarm"),
        "online_repair_rate": rate(rep, "guarded_ok"),
        "repairable_runs": len(rep),
        "median_detection_delay": statistics.median(delays) if delays else None,
        "overhead_median_ratio": statistics.median(ratios) if ratios else None,
    }
    st_path = [r for r in path if "structural" in r]
    if st_path:
        st_h = [r for r in healthy if "structural" in r]
        out["structural_repair_rate"] = sum(r["structural"]["ok"] for r in st_path) / len(st_path)
        out["structural_named"] = sum(r["structural"]["named"] for r in st_path) / len(st_path)
        out["structural_false_alarm_rate"] = (sum(r["structural"]["false_alarm"] for r in st_h)
                                              / len(st_h) if st_h else None)
        tr = [r["structural"]["seconds"] / r["seconds_bare"] for r in st_path if r["seconds_bare"] > 0]
        out["structural_time_median_ratio"] = statistics.median(tr) if tr else None
    names = sorted({k for r in path for k in r.get("baselines", {})})
    for b in names:
        rs = [r for r in rep if b in r["baselines"]]
        out[f"repair_rate_{b}"] = (sum(r["baselines"][b]["ok"] for r in rs) / len(rs)) if rs else None
        hs = [r for r in healthy if b in r["baselines"]]
        out[f"healthy_pass_rate_{b}"] = (sum(r["baselines"][b]["ok"] for r in hs) / len(hs)) if hs else None
    return out


def write_json(path: str, records: list[dict[str, Any]]) -> None:
    """Durable atomic write (see trainguard._fsio); NaN/Inf as strings."""
    from .._fsio import atomic_write
    from ..sinks.jsonl import encode
    atomic_write(path, lambda fh: json.dump(encode(records), fh, indent=1, allow_nan=False),
                 prefix=".zoo-", mode=0o644)


# ----------------------------------------------------------------------------- presentation
def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        return f"{v:.{nd}g}"
    return str(v)


def _outcome(ok: bool, err: str | None) -> str:
    if ok:
        return "pass"
    if err and err.startswith("TrainingUnstable"):
        return "FAIL (halted)"
    return "FAIL"


def _first_by_kind(rec: dict[str, Any]) -> str:
    seen: dict[str, int] = {}
    for k, st in zip(rec["findings"], rec["finding_steps"]):
        seen.setdefault(k, st)
    return ", ".join(f"{k}@{st}" for k, st in seen.items()) or "-"


def _actions(rec: dict[str, Any]) -> str:
    cnt: dict[str, int] = {}
    for k in rec["actions"]:
        cnt[k] = cnt.get(k, 0) + 1
    return ", ".join(f"{k}x{n}" for k, n in cnt.items()) or "-"


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in records:
        ratio = r["seconds_guarded"] / r["seconds_bare"] if r["seconds_bare"] > 0 else math.nan
        base = " ".join(f"{k}:{'P' if v['ok'] else 'F'}" for k, v in r.get("baselines", {}).items())
        rows.append([f"{r['scenario']}#{r['seed']}", r["category"][:5], r["mechanism"].split(":")[0][:48],
                     _outcome(r["bare_ok"], r["bare_error"]), _first_by_kind(r), _actions(r),
                     _outcome(r["guarded_ok"], r["guarded_error"]),
                     f"{_fmt(r['guarded_metric'])} / {_fmt(r['reference'])}",
                     f"{ratio:.2f}", base or "-"])
    return rows


HEADERS = ["scenario#seed", "cat", "mechanism", "bare", "findings (first step)", "actions",
           "guarded", "metric / ref", "time g/b", "baselines"]


def print_report(records: list[dict[str, Any]], tot: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for row in table_rows(records):
            print(" | ".join(row))
        for k, v in tot.items():
            print(f"{k}: {_fmt(v)}")
        return
    con = Console(width=max(200, Console().width))
    t = Table(title="trainguard stability zoo", show_lines=False)
    for h in HEADERS:
        t.add_column(h, overflow="fold")
    for row in table_rows(records):
        t.add_row(*row)
    con.print(t)
    tt = Table(title="totals")
    tt.add_column("score")
    tt.add_column("value")
    for k, v in tot.items():
        tt.add_row(k, _fmt(v))
    con.print(tt)


def markdown(records: list[dict[str, Any]], tot: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in table_rows(records):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    lines += ["", "| score | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in tot.items()]
    return "\n".join(lines) + "\n"


def select(args: argparse.Namespace) -> list[Scenario]:
    from . import scenarios  # noqa: F401  (registers every scenario module)
    chosen = list(REGISTRY.values())
    if args.only:
        chosen = [s for s in chosen if any(s.name == o or s.name.startswith(o) for o in args.only)]
        if not chosen:
            raise SystemExit(f"no scenario matches {args.only}; known: {', '.join(sorted(REGISTRY))}")
    if args.fast:
        chosen = [s for s in chosen if s.fast]
    return chosen


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    torch.set_num_threads(max(1, args.threads))
    if args.device != "cpu":
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:
            raise SystemExit(f"--device {args.device}: not usable here ({e})")
    if getattr(args, "framework", "torch") == "keras":
        return _run_keras(args)
    chosen = select(args)
    jobs = [(s, seed) for s in chosen for seed in range(args.seeds)]
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    from ..progress import Progress
    with Progress(len(jobs), "zoo", enabled=True) as progress:
        for s, seed in jobs:
            progress.start(f"{s.name} seed {seed}")
            records.append(run_one(s, seed, not args.no_baselines, args.device,
                                   report_dir=getattr(args, "reports", None),
                                   structural=getattr(args, "structural", False)))
    return _report(records, args, t0)


def _run_keras(args: argparse.Namespace) -> int:
    """``--framework keras``: the Keras subset (zoo/keras_zoo.py), scored with the same totals."""
    try:
        from . import keras_zoo
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"--framework keras needs Keras 3: pip install 'trainguard[keras]' ({e})")
    if args.device != "cpu":
        raise SystemExit("--framework keras runs on Keras' own device placement; drop --device")
    t0 = time.perf_counter()
    from ..progress import Progress
    jobs = [(s, seed) for s in keras_zoo.select(args.only) for seed in range(args.seeds)]
    records = []
    with Progress(len(jobs), "keras zoo", enabled=True) as progress:
        for s, seed in jobs:
            progress.start(f"{s.name} seed {seed}")
            records.append(keras_zoo.run_one(s, seed))
    return _report(records, args, t0)


def _report(records: list[dict[str, Any]], args: argparse.Namespace, t0: float) -> int:
    tot = totals(records)
    tot["wall_seconds"] = time.perf_counter() - t0
    print_report(records, tot)
    if args.json:
        write_json(args.json, records)
        write_json(os.path.splitext(args.json)[0] + ".totals.json", [tot])
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(markdown(records, tot))
    return 0
