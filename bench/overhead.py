"""Per-step overhead of the Guard against the bare loop and peer tools, measured side by side.

    python bench/overhead.py [--model mlp|cnn|gpt] [--rounds 15] [--block 40] [--threads 1] [--json PATH]
    python bench/overhead.py --sweep [--rounds 7] [--block 20]   # 0.3-50 ms steps, 1-1,000 tensors
    python bench/overhead.py --only guard "guard integrity='step'" --rounds 41   # a few variants

Every variant trains its own copy of the same seeded model whose bare step takes well over
5 ms on one CPU thread: ``--model mlp`` (an MLP on a 256-sample batch: few FLOPs per weight,
the worst case for a probe that reads every gradient), ``--model cnn`` (a small CNN on
3x32x32 inputs, batch 32) or ``--model gpt`` (a 2-layer nanoGPT-shaped decoder, width 128,
vocabulary 2048, context 64, batch 8, AdamW, fp32: a language model as people train one, at a
size a CPU runs). Adam (AdamW for the GPT). Variants run in blocks of
``--block`` steps, interleaved round-robin for ``--rounds`` rounds after a warm-up, so slow
drifts of the machine hit every variant alike; each block's time is divided by the bare
block of the same round and the median ratio over rounds is reported.

Variants: the Guard at default settings (one host transfer per step), the Guard with
``sync=False``, ``torch.autograd.detect_anomaly``, ``clip_grad_norm_(max_norm=1.0)``,
per-parameter ``.item()`` norm logging (what wandb.watch-style loggers do), ``grad read`` (one
fused read of the gradients and one host transfer: the floor of a guard that decides on the
host), and ZClip when the ``zclip`` package is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import trainguard as tg  # noqa: E402


#: ``--model gpt``: a small nanoGPT-shaped decoder (bench/overhead_gpu.py's GPT, fp32 on CPU)
GPT_LAYERS, GPT_VOCAB, GPT_CTX = 2, 2048, 64


def make(model: str, width: int, seed: int = 0, fused: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    if model == "gpt":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from overhead_gpu import GPT
        gpt: nn.Module = GPT(GPT_VOCAB, GPT_CTX, width, GPT_LAYERS, max(1, width // 64))
        return gpt, torch.optim.AdamW(gpt.parameters(), lr=3e-4, fused=fused or None)
    if model == "mlp":
        m = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    else:  # a small CIFAR-shaped CNN
        m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(128, 10))
    return m, torch.optim.Adam(m.parameters(), lr=1e-3, fused=fused or None)


def _loop(model: str, width: int, *, guard: dict | None = None,
          after_backward: Callable[[nn.Module, list], None] | None = None,
          anomaly: bool = False, fused: bool = False) -> Callable[[], Callable[[torch.Tensor, torch.Tensor], None]]:
    """One training-step function per variant; everything but the marked part is identical."""
    def build():
        m, o = make(model, width, fused=fused)
        g = tg.Guard(m, o, console=False, **guard) if guard is not None else None
        log: list = []

        def step(x, y):
            o.zero_grad()
            ctx = torch.autograd.detect_anomaly() if anomaly else contextlib.nullcontext()
            with ctx:
                out = m(x)
                if out.dim() == 3:  # a language model's (batch, time, vocab) logits
                    out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
                loss = nn.functional.cross_entropy(out, y)
                loss.backward()
            if after_backward is not None:
                after_backward(m, log)
            if g is not None:
                g.step(loss)
            else:
                o.step()
        return step
    return build


def _grad_read(m: nn.Module, log: list) -> None:
    """The floor of a guard's default mode: one fused read of the gradients and one host
    transfer of the per-tensor norms (no decision, no record)."""
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    log.append(torch.stack(torch._foreach_norm(grads)).tolist())
    del log[:-1000]


def _item_logging(m: nn.Module, log: list) -> None:
    for p in m.parameters():
        log.append(p.grad.norm().item())
    del log[:-1000]


def variants(model: str, width: int, zclip: bool = True
             ) -> dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], None]]]:
    out = {
        "bare": _loop(model, width),
        "guard": _loop(model, width, guard={}),
        "guard sync=False": _loop(model, width, guard={"sync": False}),
        # the accelerator's sync=False (backup, device-side select, late decisions), on CPU
        "guard sync='deferred'": _loop(model, width, guard={"sync": "deferred"}),
        "guard param_norm_every=1": _loop(model, width, guard={"param_norm_every": 1}),
        "guard integrity='step'": _loop(model, width, guard={"integrity": "step"}),
        "guard locate=False": _loop(model, width, guard={"locate": False}),  # the replay capture's share
        # the detectors' share: measurement, policy and executor without a single rule
        "guard detectors=[]": _loop(model, width, guard={"detectors": []}),
        "guard detectors=[], locate=False": _loop(model, width, guard={"detectors": [], "locate": False}),
        # the four rules whose remedies act on the step itself (skip, clip, rollback) alone
        "guard detectors=step4": _loop(model, width, guard={"detectors": [
            tg.detect.NonFiniteDetector(), tg.detect.LossSpikeDetector(),
            tg.detect.GradExplosionDetector(), tg.detect.DivergenceDetector()]}),
        "bare (fused Adam)": _loop(model, width, fused=True),
        "guard sync=False, fused": _loop(model, width, guard={"sync": False}, fused=True),
        "detect_anomaly": _loop(model, width, anomaly=True),
        "clip_grad_norm_": _loop(model, width, after_backward=lambda m, log: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)),
        "per-param .item()": _loop(model, width, after_backward=_item_logging),
        # the floor: one fused read of the gradients and one host transfer, nothing decided
        "grad read": _loop(model, width, after_backward=_grad_read),
    }
    if not zclip:  # not asked for: its import alone (it pulls in Lightning) takes seconds
        return out
    try:
        from zclip import ZClip  # type: ignore
        z = ZClip()
        out["ZClip"] = _loop(model, width, after_backward=lambda m, log: z.step(m))
    except Exception:  # noqa: BLE001 - optional peer
        pass
    return out


# --sweep: (name, layers, width, batch, input) -> MLPs from a 0.3 ms step to a ~50 ms one, and
# models of 1 and 1,000 parameter tensors (the per-tensor cost)
SWEEP = [
    ("Linear 16-10 (1 tensor), batch 16, plain SGD", 0, 10, 16, 16),
    ("MLP 16-32x3-10, batch 16, plain SGD", 3, 32, 16, 16),
    ("MLP 16-32x3-10, batch 16", 3, 32, 16, 16),
    ("1 tensor, linear 256x256", 0, 256, 256, 256),
    ("MLP 64-256x3-10, batch 128", 3, 256, 128, 64),
    ("MLP 64-512x3-10, batch 256", 3, 512, 256, 64),
    ("MLP 64-1024x3-10, batch 128", 3, 1024, 128, 64),
    ("1,000 tensors: 499 x Linear(16,16)", 499, 16, 32, 16),
]


def _sweep_model(layers: int, width: int, inp: int) -> nn.Module:
    if layers == 0:
        return nn.Linear(inp, width, bias=False)
    if layers == 499:
        return nn.Sequential(*[nn.Sequential(nn.Linear(inp if i == 0 else width, width), nn.Tanh())
                               for i in range(layers)], nn.Linear(width, 10))
    mods: list[nn.Module] = [nn.Linear(inp, width), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 10))


def sweep(a: argparse.Namespace) -> None:
    """The Guard's added time per step, in µs and as a ratio, from a 0.3 ms step to ~50 ms and
    from 1 to 1,000 parameter tensors, beside clip_grad_norm_ (same rounds, interleaved)."""
    from trainguard.progress import Progress
    rows = []
    with Progress(len(SWEEP), "overhead sweep", enabled=True) as progress:
        for name, layers, width, batch, inp in SWEEP:
            progress.start(name)
            gen = torch.Generator().manual_seed(0)
            n_out = width if layers == 0 else 10
            xs = torch.randn(a.block, batch, inp, generator=gen)
            ys = torch.randint(0, n_out, (a.block, batch), generator=gen)

            def build(kind: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
                torch.manual_seed(0)
                m = _sweep_model(layers, width, inp)
                o = (torch.optim.SGD(m.parameters(), lr=1e-2) if "SGD" in name
                     else torch.optim.Adam(m.parameters(), lr=1e-3))
                g = (tg.Guard(m, o, console=False, **({"sync": False} if kind == "sync" else {}))
                     if kind in ("guard", "sync") else None)

                def step(x: torch.Tensor, y: torch.Tensor) -> None:
                    o.zero_grad()
                    loss = nn.functional.cross_entropy(m(x), y)
                    loss.backward()
                    if kind == "clip":
                        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                    if g is not None:
                        g.step(loss)
                    else:
                        o.step()
                return step
            fns = {k: build(k) for k in ("bare", "guard", "clip", "sync")}
            for fn in fns.values():
                for i in range(min(10, a.block)):
                    fn(xs[i], ys[i])
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(a.rounds):
                for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
                    t0 = time.perf_counter()
                    for i in range(a.block):
                        fns[k](xs[i], ys[i])
                    times[k].append((time.perf_counter() - t0) / a.block)
            bare = times["bare"]
            n_tensors = sum(1 for _ in _sweep_model(layers, width, inp).parameters())
            row = {"model": name, "tensors": n_tensors, "bare_ms": statistics.median(bare) * 1e3}
            for k in ("guard", "clip", "sync"):
                row[f"{k}_ratio"] = statistics.median(t / b for t, b in zip(times[k], bare))
                row[f"{k}_us"] = statistics.median((t - b) * 1e6 for t, b in zip(times[k], bare))
            rows.append(row)
    print(f"Adam unless named, {a.threads} thread(s), {a.rounds} interleaved rounds of {a.block} steps; "
          "added time = median over rounds of (variant - bare) per step")
    print(f"{'model':<36}{'tensors':>8}{'bare ms':>9}{'Guard':>8}{'+us':>7}"
          f"{'clip_grad_norm_':>17}{'+us':>7}{'sync=False':>12}{'+us':>7}")
    for r in rows:
        print(f"{r['model']:<36}{r['tensors']:>8}{r['bare_ms']:>9.2f}{r['guard_ratio']:>8.3f}"
              f"{r['guard_us']:>7.0f}{r['clip_ratio']:>17.3f}{r['clip_us']:>7.0f}"
              f"{r['sync_ratio']:>12.3f}{r['sync_us']:>7.0f}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=2)
        os.replace(tmp, a.json)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true",
                    help="the step-size and tensor-count sweep (µs added per step beside each ratio)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=("mlp", "cnn", "gpt"), default="mlp",
                    help="gpt: a 2-layer nanoGPT-shaped decoder, vocabulary 2048, context 64, "
                         "AdamW, fp32")
    ap.add_argument("--width", type=int, default=None, help="default 512 (mlp), 128 (gpt)")
    ap.add_argument("--batch", type=int, default=None, help="default 256 (mlp), 32 (cnn), 8 (gpt)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                    help="run only these variants (and the bare loop), e.g. --only guard "
                         "\"guard integrity='step'\" \"guard param_norm_every=1\"")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.sweep:
        sweep(a)
        return
    import warnings
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    batch = a.batch or {"mlp": 256, "cnn": 32, "gpt": 8}[a.model]
    a.width = a.width or (128 if a.model == "gpt" else 512)
    gen = torch.Generator().manual_seed(0)
    if a.model == "gpt":  # random tokens and random targets (the cost does not depend on them)
        xs = torch.randint(0, GPT_VOCAB, (a.block, batch, GPT_CTX), generator=gen)
        ys = torch.randint(0, GPT_VOCAB, (a.block, batch, GPT_CTX), generator=gen)
    else:
        shape = (64,) if a.model == "mlp" else (3, 32, 32)
        xs = torch.randn(a.block, batch, *shape, generator=gen)
        ys = torch.randint(0, 10, (a.block, batch), generator=gen)
    chosen = variants(a.model, a.width, zclip=not a.only or "ZClip" in a.only)
    if a.only:
        unknown = [n for n in a.only if n not in chosen]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {list(chosen)}")
        chosen = {n: b for n, b in chosen.items() if n == "bare" or n in a.only}
    steps = {name: build() for name, build in chosen.items()}
    for fn in steps.values():  # warm-up
        for i in range(10):
            fn(xs[i % a.block], ys[i % a.block])
    times: dict[str, list[float]] = {n: [] for n in steps}
    from trainguard.progress import Progress
    progress = Progress(a.rounds, "overhead rounds", enabled=True)
    for r in range(a.rounds):
        progress.start(f"round {r + 1}")
        order = list(steps)
        if r % 2:
            order.reverse()
        for name in order:
            fn = steps[name]
            t0 = time.perf_counter()
            for i in range(a.block):
                fn(xs[i], ys[i])
            times[name].append(time.perf_counter() - t0)
    progress.close()
    bare = times["bare"]
    ms = statistics.median(bare) / a.block * 1e3
    desc = {"mlp": f"MLP 64-{a.width}x3-10", "cnn": "CNN 3x32x32, 32-64-128 channels",
            "gpt": f"GPT {GPT_LAYERS}x{a.width}, vocabulary {GPT_VOCAB}, context {GPT_CTX}"}[a.model]
    opt = "AdamW" if a.model == "gpt" else "Adam"
    print(f"model: {desc}, batch {batch}, {opt}, {a.threads} thread(s); "
          f"bare step {ms:.2f} ms (median); {a.rounds} interleaved rounds of {a.block} steps")
    print(f"{'variant':<26}{'ms/step':>10}{'ratio to bare (median)':>26}")
    result = {"model": a.model, "width": a.width, "batch": batch, "threads": a.threads, "bare_ms": ms,
              "ratios": {}}
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, bare))
        result["ratios"][name] = ratio
        print(f"{name:<26}{statistics.median(ts) / a.block * 1e3:>10.2f}{ratio:>26.3f}")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
