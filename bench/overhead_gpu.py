"""Per-step overhead of the Guard on a GPU: a ~100M-parameter GPT under bf16 autocast.

    python bench/overhead_gpu.py [--layers 12] [--width 768] [--batch 16] [--ctx 512]
                                 [--rounds 7] [--block 10] [--json PATH]
    python bench/overhead_gpu.py --only guard clip_grad_norm_ --memory --src OLD/src  # a version

A nanoGPT-shaped decoder (pre-LN, GELU MLP, untied head, vocabulary 8192) trained with fused
AdamW (what nanoGPT uses on CUDA) on random tokens. Every variant trains its own copy of the
same seeded model; variants run in blocks of ``--block`` steps, interleaved round-robin for
``--rounds`` rounds after a warm-up, each block timed with ``sync()`` at both
ends, and each block's time divided by the bare block of the same round; the median ratio is
reported with the added time per step in microseconds.

Variants: bare; ``clip_grad_norm_(1.0)``; ZClip (when the ``zclip`` package is importable);
``torch.autograd.detect_anomaly``; the Guard at default settings (one host transfer per step);
``Guard(sync=False)`` (no host sync on the step path). Also measured: the amortised cost of a
rollback snapshot (pinned host memory, asynchronous copy) and of one sampled probe step
(both timed as single synchronised steps against a plain single synchronised Guard step).
``--memory``: each variant's peak device memory during a training step, measured alone (the
other variants' models freed), beside the bare loop's. ``--src``: import trainguard from
another tree (run the script once per tree to compare versions on one machine).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

_SRC = use_tree()  # this checkout's src/, or --src DIR (before the import below)
import trainguard as tg  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(nn.functional.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def build(a: argparse.Namespace, guard: dict | None = None, anomaly: bool = False,
          after_backward: Callable[[nn.Module], None] | None = None):
    torch.manual_seed(0)
    m = GPT(a.vocab, a.ctx, a.width, a.layers, max(1, a.width // 64)).to(a.device)
    o = torch.optim.AdamW(m.parameters(), lr=3e-4, fused=True)  # nanoGPT on CUDA
    g = tg.Guard(m, o, console=False, **guard) if guard is not None else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        o.zero_grad(set_to_none=True)
        ctx = torch.autograd.detect_anomaly() if anomaly else contextlib.nullcontext()
        with ctx:
            with torch.autocast(a.device, dtype=torch.bfloat16):
                logits = m(x)
            loss = nn.functional.cross_entropy(logits.float().view(-1, a.vocab), y.view(-1))
            loss.backward()
        if after_backward is not None:
            after_backward(m)
        if g is not None:
            g.step(loss)
        else:
            o.step()
    return step, m, o, g


def peak_memory(a: argparse.Namespace, specs: dict, steps: dict, xs: torch.Tensor,
                ys: torch.Tensor, sync: Callable[[], None]) -> dict[str, float]:
    """Each variant's peak device memory over two training steps, measured alone: every other
    variant's model freed, three warm-up steps (optimizer state, first snapshot), the peak
    counter reset, two steps. MiB; CUDA only (empty elsewhere)."""
    out: dict[str, float] = {}
    if a.device != "cuda":
        return out
    for _, g in steps.values():
        if g is not None:
            g.close()
    steps.clear()
    import gc
    for name, spec in specs.items():
        gc.collect()
        torch.cuda.empty_cache()
        fn, m, o, g = build(a, **spec)
        for i in range(3):
            fn(xs[i % a.block], ys[i % a.block])
        sync()
        torch.cuda.reset_peak_memory_stats()
        for i in range(3, 5):
            fn(xs[i % a.block], ys[i % a.block])
        sync()
        out[name] = torch.cuda.max_memory_allocated() / 2**20
        if g is not None:
            g.close()
        del fn, m, o, g
    gc.collect()
    print(f"{'variant':<34}{'peak MiB':>10}{'vs bare':>10}")
    for name, mib in out.items():
        print(f"{name:<34}{mib:>10.0f}{mib - out.get('bare', mib):>+10.0f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to smoke-test")
    ap.add_argument("--src", default=None, help="import trainguard from this src/ directory")
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT",
                    help="run only these variants (and the bare loop)")
    ap.add_argument("--memory", action="store_true",
                    help="also measure each variant's peak device memory in a step, alone")
    ap.add_argument("--cprofile", action="store_true",
                    help="also print the Python profiles (cProfile, by own time) of 20 plain and 5 "
                         "sampled guarded steps")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler tables (host time per op) of 5 guarded steps")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
    torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(device=a.device).manual_seed(0)
    xs = torch.randint(0, a.vocab, (a.block, a.batch, a.ctx), device=a.device, generator=gen)
    ys = torch.randint(0, a.vocab, (a.block, a.batch, a.ctx), device=a.device, generator=gen)
    specs: dict[str, dict[str, Any]] = {
        "bare": {},
        "clip_grad_norm_": {"after_backward": lambda m: nn.utils.clip_grad_norm_(m.parameters(), 1.0)},
        "guard": {"guard": {}},
        "guard sync=False": {"guard": {"sync": False}},
        "guard clip=None": {"guard": {"clip": None}},
        "guard locate=False": {"guard": {"locate": False}},
        "guard detectors=[], locate=False": {"guard": {"detectors": [], "locate": False}},
        "detect_anomaly": {"anomaly": True},
    }
    if not a.only or "ZClip" in a.only:
        try:
            from zclip import ZClip  # type: ignore
            z = ZClip()
            specs["ZClip"] = {"after_backward": lambda m: z.step(m)}
        except Exception:  # noqa: BLE001 - optional peer
            pass
    if a.only:
        unknown = [n for n in a.only if n not in specs and n != "ZClip"]
        if unknown:
            ap.error(f"unknown variant(s) {unknown}; known: {sorted(specs)}")
        specs = {n: s for n, s in specs.items() if n == "bare" or n in a.only}
    else:  # the default table: the breakdown variants only when asked for
        specs = {n: s for n, s in specs.items() if not n.startswith(("guard locate", "guard detectors"))}
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
                              "src": os.path.abspath(_SRC), "ratios": {}, "added_us": {}, "ms": {}}
    steps = {}
    for name, spec in specs.items():
        fn, m, o, g = build(a, **spec)
        steps[name] = (fn, g)
        nparam = sum(p.numel() for p in m.parameters())
    result["params"] = nparam
    for fn, _ in steps.values():  # warm-up
        for i in range(3):
            fn(xs[i % a.block], ys[i % a.block])
    sync()
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(a.rounds):
        order = list(steps)
        if r % 2:
            order.reverse()
        for name in order:
            fn, _ = steps[name]
            sync()
            t0 = time.perf_counter()
            for i in range(a.block):
                fn(xs[i % a.block], ys[i % a.block])
            sync()
            times[name].append(time.perf_counter() - t0)
    bare = times["bare"]
    bare_ms = statistics.median(bare) / a.block * 1e3
    print(f"{result['device']}, torch {torch.__version__}: GPT {a.layers}x{a.width}, "
          f"{nparam / 1e6:.1f}M parameters, batch {a.batch}x{a.ctx}, bf16 autocast, fused AdamW; "
          f"bare step {bare_ms:.2f} ms; {a.rounds} interleaved rounds of {a.block} steps")
    print(f"{'variant':<34}{'ms/step':>10}{'ratio':>8}{'added us/step':>15}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, bare))
        added = statistics.median((t - b) / a.block * 1e6 for t, b in zip(ts, bare))
        result["ratios"][name], result["added_us"][name] = ratio, added
        result["ms"][name] = statistics.median(ts) / a.block * 1e3
        print(f"{name:<34}{result['ms'][name]:>10.2f}{ratio:>8.3f}{added:>15.0f}")
    # the rollback snapshot (pinned host memory, asynchronous copy) and a sampled probe step
    if "guard" in steps:
        _, g = steps["guard"]
        store = g.snapshots
        for k in range(3):  # the first takes allocate pinned buffers; the steady state reuses them
            sync()
            t0 = time.perf_counter()
            store.take(10**6 + k)
            host_ms = (time.perf_counter() - t0) * 1e3
            sync()
            total_ms = (time.perf_counter() - t0) * 1e3
        snap_mb = store.snaps[-1].nbytes() / 2**20
        every = store.every
        result["snapshot"] = {"host_ms": host_ms, "until_landed_ms": total_ms, "mb": snap_mb,
                              "every": every, "amortised_fraction": host_ms / (every * bare_ms)}
        print(f"snapshot: {snap_mb:.0f} MiB, host blocked {host_ms:.1f} ms, landed after "
              f"{total_ms:.1f} ms; amortised over {every} steps: {100 * host_ms / (every * bare_ms):.2f}% "
              "of a step (host time)")
        fn, g = steps["guard"]

        def single(sampled: bool) -> float:
            """One synchronised step (no pipelining with the next): median of 5."""
            ts = []
            for i in range(5):
                if sampled:
                    g.sampler.arm()
                sync()
                t0 = time.perf_counter()
                fn(xs[i % a.block], ys[i % a.block])
                sync()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts) * 1e3
        plain_ms, sampled_ms = single(False), single(True)
        plain_ms = min(plain_ms, single(False))  # plain steps before and after the sampled ones
        extra = sampled_ms - plain_ms
        result["sampled_step"] = {"ms": sampled_ms, "plain_ms": plain_ms, "extra_ms": extra,
                                  "amortised_fraction": extra / (g.sample_every * bare_ms)}
        print(f"sampled probe step: {sampled_ms:.2f} ms against a plain step timed alike "
              f"{plain_ms:.2f} ms (+{extra:.2f} ms), amortised over {g.sample_every} steps: "
              f"{100 * extra / (g.sample_every * bare_ms):.2f}% of a step")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
        for name in [n for n in ("guard", "clip_grad_norm_") if n in steps]:
            fn, _ = steps[name]
            with profile(activities=acts) as prof:
                for i in range(5):
                    fn(xs[i % a.block], ys[i % a.block])
                sync()
            print(f"-- profile: {name}, 5 steps, by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    if a.cprofile and "guard" in steps:
        import cProfile
        import pstats
        fn, g = steps["guard"]
        for label, n, sampled in (("20 plain steps", 20, False), ("5 sampled steps", 5, True)):
            pr = cProfile.Profile()
            sync()
            for i in range(n):
                if sampled:
                    g.sampler.arm()
                pr.enable()
                fn(xs[i % a.block], ys[i % a.block])
                sync()
                pr.disable()
            print(f"-- cProfile: guard, {label}, by own time")
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    if a.memory:
        result["peak_mib"] = peak_memory(a, specs, steps, xs, ys, sync)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)


if __name__ == "__main__":
    main()
