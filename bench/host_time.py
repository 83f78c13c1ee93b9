"""The Guard's host time per step, by what the step did (issue #15: "fixed host cost per healthy
step"), beside what ``clip_grad_norm_`` and a bare read of the gradients take in the same run.

    python bench/host_time.py [--model small|mlp|many|frozen|experts] [--rounds 40] [--block 50]
    python bench/host_time.py --src OTHER/src          # another tree's trainguard
    python bench/host_time.py --rules                  # and each detector's share
    python bench/host_time.py --compare OTHER/src --runs 3   # both trees, runs alternated
                                          # (with --src THIS/src: that tree as "this")

Three loops train three copies of the same seeded model in one process, in blocks of
``--block`` steps interleaved round-robin for ``--rounds`` rounds (one CPU thread):

- **guard**: ``guard.step(loss)`` at the defaults; its time *minus the optimizer's own update*
  (timed inside), and the locate capture's hooks (timed where they run, in the forward and
  the backward): everything the Guard adds on the host, step by step;
- **clip**: the time of one ``clip_grad_norm_(params, 1.0)`` call, the cheapest peer that reads
  every gradient (a fused norm, a total, an in-place scaling);
- **read**: the time of one fused read of the gradients and one host transfer
  (``torch.stack(torch._foreach_norm(grads)).tolist()``): the floor of a guard that decides on
  the host.

The Guard's steps are grouped by what it did on them: *plain* (the healthy step), *params* (the
``param_norm_every`` = 10 cadence: weights, optimizer state and running statistics read too),
*sampled* (the ``sample_every`` = 50 probes: activations, update ratios, optimizer-state
fractions), *snapshot* (a rollback snapshot was taken after the step: every 100). Each group's
median is reported (``guard.step`` alone), the capture hooks' median, and what a run pays per
step amortised: each group's median weighted by its share of the steps, plus the hooks' median
(a plain mean over the steps counts every preemption of a shared machine; it is printed too).
Never asserted anywhere: this machine is shared, and absolute times move by tens of percent
between runs; ``--compare`` alternates the two trees' runs so that drifts hit both.

Models: ``small`` (the default) MLP 64-32x3-10, batch 16, Adam (8 tensors, ~1.3 ms steps: where a
fixed cost shows); ``mlp`` MLP 64-512x3-10, batch 256, Adam; ``many`` 499 x (Linear(16,16),
Tanh) + Linear(16,10), batch 32, Adam (1,000 tensors); ``frozen`` the small MLP with its first
layer frozen but left in the optimizer (parameters without gradients on every step); ``experts``
a trunk and 8 expert heads taken in turn (another set of parameters with gradients each step);
``cnn`` the small CIFAR-shaped CNN of ``bench/overhead.py --model cnn`` (~20 ms steps: where
the sampled probes' share shows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

SRC = use_tree()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402
from trainguard.locate import _capture  # noqa: E402
from trainguard.remedies import executor as _executor  # noqa: E402

MODELS = {
    "small": "MLP 64-32x3-10, batch 16, Adam",
    "mlp": "MLP 64-512x3-10, batch 256, Adam",
    "many": "1,000 tensors: 499 x (Linear(16,16), Tanh), batch 32, Adam",
    "frozen": "MLP 64-32x3-10, first layer frozen and left in the optimizer, batch 16, Adam",
    "experts": "Linear(64,32)+ReLU trunk, 8 expert heads Linear(32,10) taken in turn, batch 16, Adam",
    "cnn": "CNN 3x32x32, 32-64-128 channels (bench/overhead.py's), batch 32, Adam",
}


class _Experts(nn.Module):
    """A trunk and 8 expert heads, one head per training step in turn (a mixture of experts'
    routing at its simplest: which parameters have gradients changes every step)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.experts = nn.ModuleList(nn.Linear(32, 10) for _ in range(8))
        self.turn = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.experts[self.turn % len(self.experts)]
        if torch.is_grad_enabled():
            self.turn += 1
        return head(self.trunk(x))
KINDS = ("plain", "params", "sampled", "snapshot")


def make(model: str) -> tuple[nn.Module, torch.optim.Optimizer, int, int]:
    torch.manual_seed(0)
    if model == "experts":
        m: nn.Module = _Experts()
        return m, torch.optim.Adam(m.parameters(), lr=1e-3), 64, 16
    if model == "cnn":
        m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(128, 10))
        return m, torch.optim.Adam(m.parameters(), lr=1e-3), 0, 32
    if model == "many":
        m = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(499)],
                          nn.Linear(16, 10))
        inp, batch = 16, 32
    else:
        w, batch = (512, 256) if model == "mlp" else (32, 16)
        m = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                          nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
        inp = 64
        if model == "frozen":  # fine-tuning's habit: frozen, yet handed to the optimizer
            m[0].requires_grad_(False)
    return m, torch.optim.Adam(m.parameters(), lr=1e-3), inp, batch


def kind_of(step: int, snapshot_every: int) -> str:
    """What the Guard does at ``step`` at its default cadences (sampled and parameter steps
    coincide every 50: counted as sampled; a snapshot is taken after steps 99, 199, ...)."""
    if step % 50 == 0:
        return "sampled"
    if (step + 1) % snapshot_every == 0:
        return "snapshot"
    if step % 10 == 0:
        return "params"
    return "plain"


def measure(a: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    _, _, inp, batch = make(a.model)
    shape = (3, 32, 32) if a.model == "cnn" else (inp,)
    xs = torch.randn(a.block, batch, *shape, generator=gen)
    ys = torch.randint(0, 10, (a.block, batch), generator=gen)
    ns = time.perf_counter_ns
    update = [0]
    original = _executor.Executor._update

    def timed_update(self, scaled):  # type: ignore[no-untyped-def]
        t = ns()
        original(self, scaled)
        update[0] += ns() - t
    _executor.Executor._update = timed_update  # type: ignore[method-assign]
    # the locate capture's hooks run inside the forward (and the output's gradient hook inside
    # the backward): timed where they run, counted to the step they belong to
    hooks = [0]
    patched = {}
    for hname in ("_on_forward", "_on_pre", "_store_grad", "_store_node_grad"):
        fn = getattr(_capture.StepCapture, hname, None)
        if fn is None:  # an older tree without that hook
            continue
        patched[hname] = fn

        def timed(self, *args, __fn=fn, **kw):  # type: ignore[no-untyped-def]
            t = ns()
            try:
                return __fn(self, *args, **kw)
            finally:
                hooks[0] += ns() - t
        setattr(_capture.StepCapture, hname, timed)

    loops = {}
    times: dict[str, list[float]] = {"clip": [], "read": [], "hooks": []}
    by_kind: dict[str, list[float]] = {k: [] for k in KINDS}
    guard_all: list[float] = []
    rules: dict[str, list[float]] = {}
    rule_ns: dict[str, int] = {}
    for name in ("guard", "clip", "read"):
        m, o, _, _ = make(a.model)
        g = tg.Guard(m, o, console=False) if name == "guard" else None
        loops[name] = (m, o, g)
        if g is not None and a.rules:
            # each rule's update timed in place (about 0.2 us of wrapper each)
            for det in g.core.detectors:
                label = type(det).__name__
                rules[label], rule_ns[label] = [], 0

                def timed_rule(s, __f=det.update, __label=label):  # type: ignore[no-untyped-def]
                    t = ns()
                    try:
                        return __f(s)
                    finally:
                        rule_ns[__label] += ns() - t
                det.update = timed_rule  # type: ignore[method-assign]

    def run(name: str, i: int, record: bool) -> None:
        m, o, g = loops[name]
        o.zero_grad()
        hooks[0] = 0
        for label in rule_ns:
            rule_ns[label] = 0
        loss = nn.functional.cross_entropy(m(xs[i]), ys[i])
        loss.backward()
        if g is not None:
            step = g.core.step_count
            update[0] = 0
            t = ns()
            g.step(loss)
            dt = (ns() - t - update[0]) / 1e3
            if record:
                by_kind[kind_of(step, g.snapshots.every)].append(dt)
                guard_all.append(dt + hooks[0] / 1e3)
                times["hooks"].append(hooks[0] / 1e3)
                if kind_of(step, g.snapshots.every) == "plain":
                    for label, v in rule_ns.items():
                        rules[label].append(v / 1e3)
            return
        params = [p for p in m.parameters()]
        t = ns()
        if name == "clip":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            torch.stack(torch._foreach_norm(grads)).tolist()
        dt = (ns() - t) / 1e3
        o.step()
        if record:
            times[name].append(dt)

    for name in loops:  # warm-up
        for i in range(min(20, a.block)):
            run(name, i, False)
    order = list(loops)
    for r in range(a.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            for i in range(a.block):
                run(name, i, True)
    _executor.Executor._update = original  # type: ignore[method-assign]
    for hname, fn in patched.items():
        setattr(_capture.StepCapture, hname, fn)
    med = {k: statistics.median(v) for k, v in by_kind.items() if v}
    # amortised: each kind's median at its share of the steps (robust to the preemptions of a
    # shared machine, which a plain mean over the steps is not), plus the capture hooks
    n_all = sum(len(v) for v in by_kind.values())
    amortised = sum(med[k] * len(v) / n_all for k, v in by_kind.items() if v) \
        + statistics.median(times["hooks"])
    out = {"model": MODELS[a.model], "src": os.path.abspath(SRC), "steps": len(guard_all),
           "guard_mean_us": amortised, "guard_raw_mean_us": statistics.mean(guard_all),
           "guard_median_us": {k: statistics.median(v) for k, v in by_kind.items() if v},
           "guard_count": {k: len(v) for k, v in by_kind.items()},
           "hooks_median_us": statistics.median(times["hooks"]),
           "rules_median_us": {k: statistics.median(v) for k, v in rules.items() if v},
           "clip_median_us": statistics.median(times["clip"]),
           "read_median_us": statistics.median(times["read"])}
    return out


def show(r: dict) -> None:
    med = r["guard_median_us"]
    print(f"{r['model']}; trainguard from {r['src']}; {r['steps']} guarded steps")
    print("  guard, host time per step minus the optimizer's update (median, us):")
    for k in KINDS:
        if k in med:
            extra = f"  (+{med[k] - med['plain']:.0f} over plain)" if k != "plain" else ""
            print(f"    {k:9s} {med[k]:8.1f}   n={r['guard_count'][k]}{extra}")
    print(f"  locate capture's hooks in the forward and backward (median) {r['hooks_median_us']:8.1f}")
    print(f"  guard, all of it (step + hooks), amortised over every step {r['guard_mean_us']:8.1f}"
          f"   (plain mean over the steps, preemptions and all: {r['guard_raw_mean_us']:.1f})")
    if r.get("rules_median_us"):
        ru = r["rules_median_us"]
        print(f"  the rules on a plain step (medians, us; included above): {sum(ru.values()):.1f} = "
              + ", ".join(f"{k.replace('Detector', '')} {v:.1f}"
                          for k, v in sorted(ru.items(), key=lambda kv: -kv[1]) if v > 0.05))
    print(f"  clip_grad_norm_ call (median)  {r['clip_median_us']:8.1f}")
    print(f"  one read of the gradients + transfer (median) {r['read_median_us']:8.1f}")


def compare(a: argparse.Namespace) -> None:
    trees = {"other": a.compare, "this": SRC}  # this checkout's src/, or --src
    got: dict[str, list[dict]] = {k: [] for k in trees}
    for r in range(a.runs):
        for name in (["other", "this"] if r % 2 == 0 else ["this", "other"]):
            cmd = [sys.executable, os.path.abspath(__file__), "--model", a.model, "--rounds",
                   str(a.rounds), "--block", str(a.block), "--src", trees[name], "--json", "-"]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            got[name].append(res)
            print(f"run {r + 1} {name}: plain {res['guard_median_us']['plain']:.0f} us, "
                  f"amortised {res['guard_mean_us']:.0f} us, clip {res['clip_median_us']:.0f} us",
                  flush=True)
    print(f"\n{MODELS[a.model]}; {a.runs} runs per tree, alternated; median over runs (us)")
    print(f"{'':22s} {'other: ' + os.path.basename(os.path.dirname(os.path.abspath(a.compare))):>24s} {'this':>10s}")
    for k in KINDS:
        vals = {t: [x["guard_median_us"].get(k) for x in got[t]] for t in trees}
        if all(v is not None for vs in vals.values() for v in vs):
            print(f"  guard {k:15s} {statistics.median(vals['other']):24.1f} "
                  f"{statistics.median(vals['this']):10.1f}")
    # the machine's speed drifts between runs; within a run, the Guard's amortised host time
    # over one clip_grad_norm_ call is a ratio both trees can be compared on
    ratio = {t: [x["guard_mean_us"] / x["clip_median_us"] for x in got[t]] for t in trees}
    print(f"  {'guard amortised / clip':21s} {statistics.median(ratio['other']):24.2f} "
          f"{statistics.median(ratio['this']):10.2f}   (per run: "
          + "; ".join(f"{t} " + ", ".join(f"{v:.2f}" for v in ratio[t]) for t in trees) + ")")
    for key, label in (("hooks_median_us", "capture hooks"), ("guard_mean_us", "guard amortised"), ("clip_median_us", "clip_grad_norm_"),
                       ("read_median_us", "gradient read")):
        print(f"  {label:21s} {statistics.median(x[key] for x in got['other']):24.1f} "
              f"{statistics.median(x[key] for x in got['this']):10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="small")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    ap.add_argument("--compare", metavar="OTHER_SRC", help="run this tree and OTHER_SRC alternately")
    ap.add_argument("--runs", type=int, default=3, help="with --compare: runs per tree")
    ap.add_argument("--rules", action="store_true",
                    help="also time each detector's update on plain steps (adds ~0.2 us a rule)")
    ap.add_argument("--json", help="write the figures as JSON ('-': to stdout, nothing else)")
    a = ap.parse_args()
    if a.compare:
        compare(a)
        return
    r = measure(a)
    if a.json == "-":
        print(json.dumps(r))
        return
    show(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
