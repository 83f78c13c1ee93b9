"""Is the doctor's suggested learning rate safe? On every zoo model: run ``tg.doctor`` on the
scenario's model, optimizer and first batches, train a fresh copy at the suggested LR (every
parameter group and the schedule scaled by suggested / working), and compare with the same
run at the scenario's own LR.

    python bench/doctor_lr.py [--only PREFIX ...] [--seed 0] [--json out.json] [--markdown out.md]

Columns: the working LR, the suggestion and their ratio, the limit printed beside it
(``max_stable_lr``), the final metric at the working LR and at the suggestion, and two verdicts:
``criterion`` (the run at the suggestion passes the scenario's own criterion) and ``safe``
(it passes, or is no worse than 1.05x the run at the scenario's own LR: for a scenario whose
fault is not the LR - a dead layer, a vanishing sigmoid stack - the LR cannot fix it, only
must not make it worse). Scenarios whose pathology is the LR itself (the ``lr_*`` and
``curvature_*`` ones, whose "working LR" is the too-high one) are judged by the criterion.
Also checked: the suggestion is never above the curvature limit printed beside it, unless the
doctor says that limit is no guide (``limit_note``: measured after trial steps that blew up;
such rows are counted apart). Each JSON row also gives ``trial_peak``, the doctor's trial
steps' highest loss over their first, and ``limit_note``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import torch
from torch import nn

import trainguard as tg
from trainguard.zoo import REGISTRY, train
import trainguard.zoo.scenarios  # noqa: F401

torch.set_num_threads(1)


class _Forward(nn.Module):
    """The scenario's custom forward as a module, so the doctor sees model(x)."""

    def __init__(self, model: nn.Module, fwd) -> None:
        super().__init__()
        self.model, self.fwd = model, fwd

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.fwd(self.model, x)


def scaled(setup, factor: float):
    for g in setup.optimizer.param_groups:
        g["lr"] = g["lr"] * factor
        if "initial_lr" in g:
            g["initial_lr"] = g["initial_lr"] * factor
    sched = setup.scheduler
    if sched is not None and hasattr(sched, "base_lrs"):
        sched.base_lrs = [b * factor for b in sched.base_lrs]
    return setup


def lr_of(opt) -> float:
    lr = opt.param_groups[0]["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def one(name: str, seed: int) -> dict:
    s = REGISTRY[name]
    st = s.build(seed)
    # the peak LR: a warm-up schedule has already scaled the group's lr down at construction
    sched = st.scheduler
    working = float(sched.base_lrs[0]) if sched is not None and hasattr(sched, "base_lrs") \
        else lr_of(st.optimizer)
    data = list(itertools.islice(st.batches(), 32))
    model = _Forward(st.model, st.forward) if st.forward else st.model
    t0 = time.perf_counter()
    rep = tg.doctor(model, st.loss_fn, data, st.optimizer, precision=False, noise=False)
    t_doc = time.perf_counter() - t0
    # the doctor sees the optimizer's current LR (under a warm-up, the first step's); its
    # suggestion applies to that LR, so scale the peak by the same factor
    sugg = rep.suggested_lr * working / lr_of(st.optimizer)
    rt = rep.range_test
    base = train(s.build(seed), "bare")
    at = train(scaled(s.build(seed), sugg / working), "bare")
    crit = bool(s.passed(at))
    m_at = at.metric if math.isfinite(at.metric) else math.inf
    m_base = base.metric if math.isfinite(base.metric) else math.inf
    lim = rep.max_stable_lr
    return judge({"scenario": name, "category": s.category, "working_lr": working, "suggested_lr": sugg,
            "ratio": sugg / working, "max_stable_lr": lim,
            "within_limit": not (math.isfinite(lim) and sugg > lim * (1 + 1e-9)),
            "limit_note": rep.limit_note,
            "metric_working": m_base, "metric_suggested": m_at, "passes_working": bool(s.passed(base)),
            "criterion": crit, "onset": s.onset, "higher_is_better": st.higher_is_better,
            "doctor_seconds": round(t_doc, 1),
            "range_diverge": rt.lr_diverge if rt is not None else None,
            "range_min_loss": rt.lr_min_loss if rt is not None else None,
            "range_improved": rt.improved if rt is not None else None,
            # the trial steps' highest loss over their first (doctor._doctor.BLOWUP_FACTOR)
            "trial_peak": _peak(rep.trial_losses)})


def _peak(losses: list[float]) -> float | None:
    if not losses or not math.isfinite(losses[0]) or losses[0] <= 0:
        return None
    return round(max(losses) / losses[0], 3)


def judge(r: dict) -> dict:
    """``safe``: an LR too high from the start (``lr_*``, ``curvature_gd_past_limit``,
    ``curvature_adam_lr_too_high``) and healthy runs must pass their criterion at the
    suggestion; any other pathology (structural, precision, data, or an LR schedule that
    spikes later, which a diagnosis before training cannot see) must pass or be no worse than
    1.05x the run at its own LR."""
    name = r["scenario"]
    r["lr_fault"] = (name.startswith(("lr_", "curvature_gd_past", "curvature_adam"))
                     and not r.get("onset"))
    m_at, m_base = r["metric_suggested"], r["metric_working"]
    worse = (m_at > 1.05 * m_base) if not r.get("higher_is_better") else (m_at < m_base / 1.05)
    r["safe"] = bool(r["criterion"] if r["lr_fault"] or r["category"] == "healthy"
                     else (r["criterion"] or not worse))
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--from-json", default=None, help="re-judge and print a saved run")
    a = ap.parse_args()
    names = sorted(n for n in REGISTRY if not a.only or any(n.startswith(p) for p in a.only))
    rows = []
    t0 = time.perf_counter()
    if a.from_json:
        with open(a.from_json) as f:
            rows = [judge(r) if "error" not in r else r for r in json.load(f)]
        names = []
    for i, n in enumerate(names):
        try:
            r = one(n, a.seed)
        except Exception as e:  # noqa: BLE001 - a crash is a result to report
            r = {"scenario": n, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        rows.append(r)
        el = time.perf_counter() - t0
        eta = el / (i + 1) * (len(names) - i - 1)
        print(f"[{i + 1}/{len(names)} {el:.0f}s, eta {eta:.0f}s] " + json.dumps(r), flush=True)
    ok = [r for r in rows if "error" not in r]
    guide = [r for r in ok if not r.get("limit_note")]  # a limit the doctor vouches for
    lines = ["| scenario | working LR | suggested | ratio | limit | metric at working | at suggested | criterion | safe |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scenario']} | error: {r['error']} |||||||| ")
            continue
        lines.append(f"| {r['scenario']} | {r['working_lr']:.3g} | {r['suggested_lr']:.3g} | "
                     f"{r['ratio']:.2g} | {r['max_stable_lr']:.3g} | {r['metric_working']:.4g} | "
                     f"{r['metric_suggested']:.4g} | {'pass' if r['criterion'] else 'FAIL'} | "
                     f"{'yes' if r['safe'] else 'NO'} |")
    summary = (f"{len(ok)} scenarios (seed {a.seed}), {len(rows) - len(ok)} errors: safe "
               f"{sum(r['safe'] for r in ok)}/{len(ok)}; criterion met at the suggestion "
               f"{sum(r['criterion'] for r in ok)}/{len(ok)} (at the working LR "
               f"{sum(r['passes_working'] for r in ok)}/{len(ok)}); suggestion within the "
               f"printed limit {sum(r['within_limit'] for r in guide)}/{len(guide)}"
               + (f" ({len(ok) - len(guide)} limit(s) marked no guide, suggestion within "
                  f"{sum(r['within_limit'] for r in ok if r not in guide)}: "
                  + ", ".join(r["scenario"] for r in ok if r not in guide) + ")"
                  if len(guide) < len(ok) else "")
               + f"; {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    print(summary)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(lines) + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
