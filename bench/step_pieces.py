"""Each piece of a plain guarded step timed where it runs: inside the training loop, right after
the forward and backward pass (issue #15: where the fixed host cost goes).

    python bench/step_pieces.py [--model small|mlp] [--steps 3000] [--warmup 300]
    python bench/step_pieces.py --alternatives      # a few replacements timed alone

Every method of the step path named in ``PIECES`` is wrapped by a ``time.perf_counter_ns``
timer on this Guard instance (an empty wrapped call is timed too: subtract it per level), the
Guard trains its own copy of the model, and the medians over ``--steps`` plain steps (no
parameter check, sampled probe or snapshot on them) are printed in µs, indented by call depth.
A second, unguarded copy of the model is timed the same way to show what the locate capture's
hooks add to the forward and backward passes. Never asserted: a shared machine moves these by
tens of percent between runs; the pieces' proportions are what the script is for.

``--alternatives`` times, warm and alone (``timeit``, best of 5): a pre-hook on an output's
autograd node against ``retain_grad()`` on it (what the capture could use instead), and
``torch._foreach_norm`` against ``torch.dot`` per flattened gradient on MLP 64-512x3-10's
gradients (a different summation order: other last bits).

Models: ``small`` MLP 64-32x3-10, batch 16, Adam (~1.3 ms steps); ``mlp`` MLP 64-512x3-10,
batch 256, Adam (~15-20 ms steps).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import timeit
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import trainguard as tg  # noqa: E402
from trainguard.locate import _capture  # noqa: E402

#: (object path from the Guard, method, label); the label's indent is its call depth
PIECES = [
    ("", "_loss_for_step", "loss check"),
    ("loopcheck", "before", "loop check before"),
    ("", "_decide", "decide"),
    ("measure", "measure", "  measure"),
    ("probe", "measure_device", "    the read (norms + loss in one vector, one transfer)"),
    ("measure", "extra_tensors", "    extra tensors"),
    ("core", "run", "  decision core"),
    ("core", "detect", "    rules"),
    ("core", "decide", "    policy"),
    ("", "_locate", "    locate hook"),
    ("", "_finish", "finish"),
    ("executor", "clip", "  clip statistics"),
    ("executor", "optimizer_step", "  optimizer step (the update itself below)"),
    ("lr", "tick", "  LR controller"),
    ("executor", "after_step", "  after the step"),
    ("loopcheck", "after", "loop check after"),
    ("", "_end_step", "end of step"),
]


def make(model: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w, batch = (32, 16) if model == "small" else (512, 256)
    m = nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                      nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 64, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return m, torch.optim.Adam(m.parameters(), lr=1e-3), x, y


def pieces(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    times: dict[str, list[int]] = {}
    plain = [True]
    pc = time.perf_counter_ns

    def timed(f: Callable[..., Any], label: str) -> Callable[..., Any]:
        def w(*args: Any, **kw: Any) -> Any:
            t = pc()
            r = f(*args, **kw)
            if plain[0]:
                times.setdefault(label, []).append(pc() - t)
            return r
        return w

    # the capture's forward hook is registered as a bound method when the Guard is built:
    # wrap it on the class first, then restore it
    real_fwd = _capture.StepCapture._on_forward
    _capture.StepCapture._on_forward = timed(real_fwd, "capture: forward hook")  # type: ignore[method-assign]
    try:
        m, opt, x, y = make(a.model)
        g = tg.Guard(m, opt, console=False)
    finally:
        _capture.StepCapture._on_forward = real_fwd  # type: ignore[method-assign]
    for path, name, label in PIECES:
        obj = g if not path else getattr(g, path)
        setattr(obj, name, timed(getattr(obj, name), label))
    opt.step = timed(opt.step, "    the optimizer's update")  # type: ignore[method-assign]
    rules = [f"      {type(d).__name__}" for d in g.core.detectors]
    for d, label in zip(g.core.detectors, rules):
        d.update = timed(d.update, label)  # type: ignore[method-assign]
    empty = timed(lambda: None, "an empty wrapped call")
    bare_m, bare_opt, _, _ = make(a.model)
    sample, every = g.measure.sample_every, g.measure.param_norm_every
    snap = g.snapshots.every

    def loop(model: nn.Module, o: torch.optim.Optimizer, guard: Any, n: int, tag: str) -> None:
        for _ in range(n):
            s = guard.core.step_count if guard is not None else 0
            plain[0] = guard is None or (s % sample and s % every and (s + 1) % snap)
            o.zero_grad(set_to_none=True)
            t = pc()
            out = model(x)
            t1 = pc()
            loss = nn.functional.cross_entropy(out, y)
            t2 = pc()
            loss.backward()
            t3 = pc()
            if guard is not None:
                guard.step(loss)
                empty()
            else:
                o.step()
            if plain[0]:
                times.setdefault(f"{tag}forward", []).append(t1 - t)
                times.setdefault(f"{tag}backward", []).append(t3 - t2)

    loop(m, opt, g, a.warmup, "guarded ")
    loop(bare_m, bare_opt, None, a.warmup, "unguarded ")
    times.clear()
    for _ in range(10):  # interleaved blocks: a drift hits both copies
        loop(m, opt, g, a.steps // 10, "guarded ")
        loop(bare_m, bare_opt, None, a.steps // 10, "unguarded ")
    g.close()
    print(f"{'MLP 64-32x3-10, batch 16' if a.model == 'small' else 'MLP 64-512x3-10, batch 256'}"
          f", Adam, 1 thread; medians over the plain steps of {a.steps}, µs")
    order = [label for _, _, label in PIECES]
    order[order.index("    rules") + 1:order.index("    rules") + 1] = rules  # the sampled-only ones rest
    order[order.index("  LR controller"):order.index("  LR controller")] = ["    the optimizer's update"]
    order.append("an empty wrapped call")
    for label in order:
        if label in times:
            print(f"  {label:<60}{statistics.median(times[label]) / 1e3:9.2f}")
    for k in ("capture: forward hook", "guarded forward", "unguarded forward",
              "guarded backward", "unguarded backward"):
        print(f"  {k:<60}{statistics.median(times[k]) / 1e3:9.2f}")


def alternatives() -> None:
    torch.set_num_threads(1)

    def best(fn: Callable[[], Any], n: int = 20000, repeat: int = 5) -> float:
        return min(timeit.repeat(fn, number=n, repeat=repeat)) / n * 1e6

    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)

    def hook(*_: Any) -> None:
        return None

    fns = {"base": lambda: lin(x).grad_fn, "pre": lambda: lin(x).grad_fn.register_prehook(hook),
           "keep": lambda: lin(x).retain_grad()}
    got: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(9):  # interleaved rounds, the best of each: a drift hits all three
        for k, fn in fns.items():
            got[k].append(best(fn, 5000, 1))
    base, pre, keep = (min(got[k]) for k in ("base", "pre", "keep"))
    print(f"nn.Linear(4, 4) forward + grad_fn: {base:.2f} µs; + a node pre-hook: +{pre - base:.2f} µs; "
          f"+ retain_grad(): +{keep - base:.2f} µs")
    m, opt, xb, yb = make("mlp")
    nn.functional.cross_entropy(m(xb), yb).backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    flat = [g.reshape(-1) for g in grads]
    n = 2000
    fused = best(lambda: torch._foreach_norm(grads, 2), n)
    dots = best(lambda: [torch.dot(f, f) for f in flat], n)
    mb = sum(g.numel() * g.element_size() for g in grads) / 1e6
    print(f"MLP 64-512x3-10's gradients ({mb:.1f} MB): torch._foreach_norm {fused:.1f} µs, "
          f"torch.dot per tensor {dots:.1f} µs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("small", "mlp"), default="small")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--alternatives", action="store_true")
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    a = ap.parse_args()
    if a.alternatives:
        alternatives()
    else:
        pieces(a)


if __name__ == "__main__":
    main()
