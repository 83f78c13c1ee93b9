"""Fault-injection campaign: the Guard never reports a skip it did not make, never leaves
non-finite or silently huge state behind, and catches every fault that manifests within a step.

    python bench/faults.py [--steps 24] [--seeds 1] [--only MODEL...] [--json PATH] [--markdown PATH]
                           [--integrity cadence|step] [--param-norm-every N]

Configurations: 6 models (MLP, CNN with BatchNorm, GRU, LSTM, a pre-LN transformer block, a
tied-embedding language model) x 6 optimizers (SGD+momentum, SGD+Nesterov, Adam, AdamW, RMSprop,
Adagrad) x 3 precisions (fp32; bf16 autocast; fp16 autocast + GradScaler), each run once without
a fault (the reference: any severe finding or intervention there is a false alarm) and once per
fault: 4 kinds (NaN, +Inf, -Inf, a flip of the float32 exponent's top bit) x 6 locations (the input
batch, a module's output, a gradient, a parameter, the loss, the optimizer state), injected at a
seeded step of a seeded run. 96 configurations (the LSTM runs in fp32 only: CPU autocast has no
bf16/fp16 LSTM kernel), 2,304 injections.

Per injected run, judged by the harness on its own reads of the tensors (not the Guard's):

- *manifested*: right after the injected step's backward pass, the loss, a gradient, a parameter,
  the optimizer state or a buffer is non-finite or larger than 1e15 in magnitude (a fault that
  leaves every value ordinary, such as a bit flip that halves a small number, does not manifest);
- *caught*: a severe finding (or the scaler's own overflow skip) at the injected step or the next;
- *clean end*: the run ends with every parameter, optimizer-state tensor and buffer finite and
  below 1e15, or the Guard halted with ``TrainingUnstable``;
- *truthful*: at every step ``guard.step`` returned True exactly when the parameters changed.

The totals: manifested faults caught within one step, runs ending unclean, silent huge corruption
(a finite value above 1e15 left without a finding), untruthful steps, and false alarms on the
references.
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
import warnings
from collections import Counter, defaultdict
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import trainguard as tg  # noqa: E402

HUGE = 1e15
KINDS = ("nan", "+inf", "-inf", "bitflip")
LOCATIONS = ("input", "output", "grad", "param", "loss", "optim")
OPTIMIZERS = ("sgd_momentum", "sgd_nesterov", "adam", "adamw", "rmsprop", "adagrad")
PRECISIONS = ("fp32", "bf16", "fp16")
ALARMS = {"skip", "rollback", "lr_backoff", "halt"}


# ------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 4, 4))


class Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(4, 24, batch_first=True)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.view(-1, 4, 4))
        return self.head(out[:, -1])


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.head = nn.Linear(d, 4)
        self.inp = nn.Linear(4, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.view(-1, 4, 4))
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


class TiedLM(nn.Module):
    """Embedding and output layer share their weight (GPT-2 style)."""

    def __init__(self, vocab: int = 4, d: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(16, d)
        self.mid = nn.Sequential(nn.Tanh(), nn.Linear(d, d), nn.Tanh())
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.emb(x[:, :1].abs().mul(1.5).long().clamp(0, 3)).squeeze(1)
        return self.out(self.mid(h))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP, "cnn_bn": CNN, "gru": lambda: Recurrent(nn.GRU), "lstm": lambda: Recurrent(nn.LSTM),
    "transformer": Block, "tied_lm": TiedLM}


def make_opt(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "sgd_nesterov":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=3e-3)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3)
    return torch.optim.Adagrad(params, lr=0.05)


# ------------------------------------------------------------------------------- faults
def fault_value(kind: str, old: float) -> float:
    if kind == "nan":
        return math.nan
    if kind == "+inf":
        return math.inf
    if kind == "-inf":
        return -math.inf
    # flip the top bit of the float32 exponent: 0.5 -> ~1.7e38, 3.0 -> ~1e-38 (a bit flip in memory)
    bits = torch.tensor([old], dtype=torch.float32).view(torch.int32)
    return float((bits ^ (1 << 30)).view(torch.float32)[0])


def poke(t: torch.Tensor, idx: int, kind: str) -> None:
    i = idx % t.numel()
    at = tuple(int(j) for j in np.unravel_index(i, tuple(t.shape))) if t.dim() else ()
    with torch.no_grad():
        t[at] = fault_value(kind, float(t[at].float()))


def bad(t: torch.Tensor) -> bool:
    t = t.detach()
    if not t.is_floating_point():
        return False
    return bool((~torch.isfinite(t)).any() or (t.abs() > HUGE).any())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN included (a skipped step leaves a NaN weight NaN)."""
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach() for p in model.parameters()]
    out += [b for b in model.buffers() if b.is_floating_point()]
    for st in opt.state.values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return out


# ------------------------------------------------------------------------------- one run
GUARD_OPTIONS: dict[str, Any] = {}


def run(model_name: str, opt_name: str, precision: str, seed: int, steps: int,
        fault: tuple[str, str, int, int] | None) -> dict[str, Any]:
    """fault = (kind, location, step, index) or None for the reference."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    opt = make_opt(opt_name, model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if precision == "fp16" else None
    guard = tg.Guard(model, opt, scaler=scaler, console=False, snapshot_every=8, **GUARD_OPTIONS)
    g = torch.Generator().manual_seed(seed)
    x_all = torch.randn(steps, 32, 16, generator=g)
    y_all = (x_all[..., :4].sum(-1) > 0).long() + (x_all[..., 4] > 0).long() * 2
    kind, where, at, idx = fault if fault is not None else ("", "", -1, 0)
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm,
                                                             nn.BatchNorm2d, nn.GRU, nn.LSTM))]
    rec: dict[str, Any] = {"model": model_name, "optimizer": opt_name, "precision": precision,
                           "seed": seed, "kind": kind, "location": where, "step": at,
                           "manifested": False, "halted": False, "untruthful": 0, "crashed": None}
    hook = None
    if where == "output":
        target = modules[idx % len(modules)]

        def out_hook(_m: nn.Module, _i: Any, out: Any) -> Any:
            if hook_state["on"]:
                o = out[0] if isinstance(out, tuple) else out
                o = o.clone()
                poke(o, idx, kind)
                return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
            return None
        hook_state = {"on": False}
        hook = target.register_forward_hook(out_hook)
    actype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    try:
        for t in range(steps):
            x, y = x_all[t].clone(), y_all[t]
            if t == at and where == "input":
                poke(x, idx, kind)
            if t == at and where == "param":
                ps = [p for p in model.parameters()]
                poke(ps[idx % len(ps)].data, idx // 7, kind)
            if t == at and where == "optim" and opt.state:
                tensors = [v for st in opt.state.values() for v in st.values()
                           if isinstance(v, torch.Tensor) and v.dim() > 0]
                if tensors:
                    poke(tensors[idx % len(tensors)], idx // 7, kind)
            if hook is not None:
                hook_state["on"] = t == at
            opt.zero_grad(set_to_none=True)
            if actype is not None:
                with torch.autocast("cpu", dtype=actype):
                    out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y)
            else:
                loss = nn.functional.cross_entropy(model(x), y)
            if t == at and where == "loss":
                loss = loss * fault_value(kind, 1.0) if kind != "nan" else loss + math.nan
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if t == at and where == "grad":
                gs = [p.grad for p in model.parameters() if p.grad is not None]
                poke(gs[idx % len(gs)], idx // 7, kind)
            if t == at:
                unscale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
                grads_bad = any(bad(p.grad * unscale) for p in model.parameters() if p.grad is not None)
                rec["manifested"] = bool(bad(loss) or grads_bad
                                         or any(bad(v) for v in state_tensors(model, opt)))
            before = [p.detach().clone() for p in model.parameters()]
            applied = guard.step(loss)
            changed = any(not same(a, b) for a, b in zip(before, model.parameters()))
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            rolled = any(a.kind == "rollback" and a.step == t for a in guard.actions[-3:])
            # a skip that changed the weights (a rollback restores them: not a change), or an
            # "applied" update that left finite weights untouched (a scaler skip called applied)
            if (not applied and changed and not rolled) or (applied and not changed and finite):
                rec["untruthful"] += 1
    except tg.TrainingUnstable:
        rec["halted"] = True
    except Exception as e:  # noqa: BLE001 - a crash is an outcome
        rec["crashed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        if hook is not None:
            hook.remove()
        guard.close()
    tensors = state_tensors(model, opt)
    rec["end_nonfinite"] = any(bool((~torch.isfinite(v)).any()) for v in tensors)
    rec["end_huge"] = any(bool((v.abs() > HUGE).any()) for v in tensors if v.is_floating_point()
                          and bool(torch.isfinite(v).all()))
    severe = [f for f in guard.findings if f.severe]
    rec["findings"] = [(f.step, f.kind) for f in guard.findings]
    rec["actions"] = [(a.step, a.kind) for a in guard.actions]
    first = min((f.step for f in severe), default=None)
    overflow_skip = guard.counts.get("scaler_overflow", 0) > 0
    rec["caught"] = bool(at >= 0 and ((first is not None and at <= first <= at + 1)
                                      or (precision == "fp16" and overflow_skip and first is None)))
    rec["alarm"] = bool(severe) or any(a.kind in ALARMS for a in guard.actions)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--only", nargs="+", default=None, help="models to run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--param-norm-every", type=int, default=None,
                    help="the Guard's param_norm_every (default: the Guard's own, 10); 1 reads "
                         "weights and optimizer state every step")
    ap.add_argument("--integrity", choices=("cadence", "step"), default=None,
                    help="the Guard's integrity mode (default: the Guard's own, 'cadence'); "
                         "'step' checks the weights every step and the update's divisor state "
                         "in two rolling halves")
    a = ap.parse_args()
    if a.integrity is not None:
        GUARD_OPTIONS["integrity"] = a.integrity
    if a.param_norm_every is not None:
        GUARD_OPTIONS["param_norm_every"] = a.param_norm_every
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    models = a.only or list(MODELS)
    records = []
    t0 = time.perf_counter()
    from trainguard.progress import Progress
    configs = [(seed, mname, oname, prec) for seed in range(a.seeds) for mname in models
               for oname in OPTIMIZERS for prec in PRECISIONS
               # CPU autocast has no bf16/fp16 LSTM kernel (oneDNN refuses it)
               if not (mname == "lstm" and prec != "fp32")]
    with Progress(len(configs), "faults", enabled=True) as progress:
        for seed, mname, oname, prec in configs:
            progress.start(f"{mname} {oname} {prec} seed {seed}")
            records.append({**run(mname, oname, prec, seed, a.steps, None), "reference": True})
            rng = random.Random(f"{mname}:{oname}:{prec}:{seed}")
            for kind in KINDS:
                for loc in LOCATIONS:
                    at = rng.randrange(3, a.steps - 2)
                    idx = rng.randrange(10**6)
                    records.append({**run(mname, oname, prec, seed, a.steps,
                                          (kind, loc, at, idx)), "reference": False})
    wall = time.perf_counter() - t0
    refs = [r for r in records if r["reference"]]
    inj = [r for r in records if not r["reference"]]
    man = [r for r in inj if r["manifested"]]
    unclean = [r for r in records if (r["end_nonfinite"] or r["end_huge"]) and not r["halted"]]
    silent_huge = [r for r in inj if r["end_huge"] and not r["halted"]
                   and not any(s >= r["step"] for s, _ in r["findings"])]
    tot = {
        "configurations": len(refs), "injections": len(inj), "manifested": len(man),
        "caught_within_one_step": sum(r["caught"] for r in man),
        "halted_with_story": sum(r["halted"] for r in inj),
        "runs_ending_unclean": len(unclean), "silent_huge": len(silent_huge),
        "untruthful_steps": sum(r["untruthful"] for r in records),
        "crashes": sum(r["crashed"] is not None for r in records),
        "false_alarms_on_references": sum(r["alarm"] for r in refs), "wall_seconds": wall,
    }
    print(json.dumps(tot, indent=2))
    by: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in man:
        c = by[(r["location"], r["kind"])]
        c["manifested"] += 1
        c["caught"] += r["caught"]
    missed = [r for r in man if not r["caught"]]
    for r in missed[:15]:
        print("missed:", {k: r[k] for k in ("model", "optimizer", "precision", "kind", "location",
                                             "step", "findings", "actions")})
    for r in unclean[:10]:
        print("unclean:", {k: r[k] for k in ("model", "optimizer", "precision", "kind", "location",
                                              "step", "findings", "actions", "end_nonfinite", "end_huge")})
    for r in [r for r in records if r["crashed"]][:10]:
        print("crash:", r["model"], r["optimizer"], r["precision"], r["kind"], r["location"], r["crashed"])
    for r in [r for r in refs if r["alarm"]][:10]:
        print("false alarm:", r["model"], r["optimizer"], r["precision"], r["findings"], r["actions"])
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"totals": tot, "records": records}, fh)
        os.replace(tmp, a.json)
    if a.markdown:
        lines = ["| location | kind | manifested | caught within one step |", "|---|---|---|---|"]
        for (loc, kind), c in sorted(by.items()):
            lines.append(f"| {loc} | {kind} | {c['manifested']} | {c['caught']} |")
        with open(a.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    _ = statistics  # (kept for ad-hoc analysis in an interactive session)


if __name__ == "__main__":
    main()
