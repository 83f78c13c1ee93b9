"""How often does locate name the right origin and module? Seeded fault injection through the
real Guard (``Guard(model, opt)``, locate on by default) over four small real models.

Faults, one per run, planted at a random step (1-3) of a short training run:

  forward     a random called module's output gets NaN/+Inf/-Inf (one element or all)
              expected: origin=forward, where=that module
  gradient    a random module's backward makes one element of its input gradient NaN/Inf
              (identity autograd function on its output, inside the module's boundary), or
              a random parameter's gradient gets NaN/Inf (tensor hook)
              expected: origin=backward, where=that module / the parameter's module
  parameter   a random parameter element is NaN/Inf before training starts
              expected: origin=parameters, where=the parameter's module
  input       one element of the batch is NaN/Inf            expected: origin=input, where=args[0]
  loss        log(0) in the loss (three variants: -inf loss with inf gradient, underflowing
              log(softmax), finite loss with infinite gradient sqrt(0))
              expected: origin=loss
  optimizer   one element of Adam's exp_avg / exp_avg_sq for a random parameter is corrupted
              (NaN/+-Inf, or a negative second moment) just before an update, which then
              writes NaN/Inf into the weight
              expected at the next step: origin=optimizer, where=the parameter's module
              (StepCapture gets the optimizer, as the Guard will once it passes it on)

A run whose fault never makes the loss, gradients or weights non-finite (e.g. -Inf into a
ReLU) is counted as "not triggered" and left out of the accuracy.

    python bench/locate_accuracy.py [--seeds 5]
"""
from __future__ import annotations

import argparse
import math
import random
import time
import zlib
from collections import defaultdict

import torch
from torch import nn

import trainguard as tg
from trainguard.locate import StepCapture

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(),
                                  nn.LayerNorm(64), nn.Linear(64, 32), nn.GELU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(64, 4))

    def forward(self, x):
        return self.classifier(self.features(x))


class TransformerBlock(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True, dropout=0.1)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.embed(x)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        out, _ = self.lstm(self.proj(x))
        return self.head(out[:, -1])


MODELS = {
    "mlp": (MLP, lambda g: torch.randn(32, 16, generator=g)),
    "cnn": (CNN, lambda g: torch.randn(16, 1, 12, 12, generator=g)),
    "transformer": (TransformerBlock, lambda g: torch.randn(16, 10, 8, generator=g)),
    "lstm": (LSTMNet, lambda g: torch.randn(16, 12, 8, generator=g)),
}
KINDS = ("forward", "gradient", "parameter", "input", "loss", "optimizer")


# ---------------------------------------------------------------------------- faults
def _bad(rng: random.Random) -> float:
    return rng.choice([math.nan, math.inf, -math.inf])


def _poison_tensor(t: torch.Tensor, val: float, whole: bool, idx: int) -> torch.Tensor:
    if whole:
        return t * val if not math.isnan(val) else t * math.nan
    mask = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    mask.view(-1)[idx % t.numel()] = True
    return torch.where(mask, torch.full_like(t, val), t)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out, lambda t: t
    if isinstance(out, tuple) and isinstance(out[0], torch.Tensor):
        return out[0], lambda t: (t,) + tuple(out[1:])
    return None, None


class _GradPoison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, val, idx):
        ctx.val, ctx.idx = val, idx
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        g.view(-1)[ctx.idx % g.numel()] = ctx.val
        return g, None, None


def called_modules(model: nn.Module, x: torch.Tensor) -> list[str]:
    names, hs = [], []
    for n, m in model.named_modules():
        hs.append(m.register_forward_hook(lambda mod, i, o, n=n: names.append(n)))
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return list(dict.fromkeys(names))


def owner(pname: str) -> str:
    return pname.rsplit(".", 1)[0] if "." in pname else "(root)"


def run_one(model_name: str, kind: str, seed: int) -> tuple[str, tuple, tuple | None]:
    """Returns (variant, expected (origin, where), got (origin, where) or None)."""
    rng = random.Random(seed * 1000 + KINDS.index(kind) * 17 + zlib.crc32(model_name.encode()) % 97)
    torch.manual_seed(seed)
    cls, make_x = MODELS[model_name]
    model = cls()
    g = torch.Generator().manual_seed(seed)
    x = make_x(g)
    y = torch.randint(0, 4, (x.shape[0],), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = tg.Guard(model, opt, console=False)
    if guard._capture is not None:
        # what the Guard does once it passes its optimizer to StepCapture (docs/locate.md,
        # proposed guard.py change): the optimizer origin needs the optimizer's state
        guard._capture.remove()
        guard._capture = StepCapture(model, optimizer=opt)
    loss_fn = nn.functional.cross_entropy
    at = rng.randint(1, 3)
    called = [n for n in called_modules(model, x)]
    params = [n for n, _ in model.named_parameters()]
    val = _bad(rng)
    handles: list = []
    expected: tuple
    variant = ""

    def plant() -> None:
        nonlocal loss_fn, variant, expected
        mods = dict(model.named_modules())
        if kind == "forward":
            name = rng.choice(called)
            whole = rng.random() < 0.5
            idx = rng.randrange(10**6)

            def hook(mod, i, out):
                t, pack = _first_tensor(out)
                return None if t is None else pack(_poison_tensor(t, val, whole, idx))
            handles.append(mods[name].register_forward_hook(hook))
            expected = ("forward", name or "(root)")
            variant = f"{val} {'all' if whole else 'one'}"
        elif kind == "gradient":
            if rng.random() < 0.5:
                pname = rng.choice(params)
                p = dict(model.named_parameters())[pname]
                idx = rng.randrange(10**6)

                def phook(gr):
                    gr = gr.clone(memory_format=torch.contiguous_format)
                    gr.view(-1)[idx % gr.numel()] = val
                    return gr
                handles.append(p.register_hook(phook))
                expected = ("backward", owner(pname))
                variant = f"param-grad {val}"
            else:
                name = rng.choice([n for n in called if n])
                idx = rng.randrange(10**6)

                def ghook(mod, i, out):
                    t, pack = _first_tensor(out)
                    if t is None or not t.requires_grad:
                        return None
                    return pack(_GradPoison.apply(t, val, idx))
                handles.append(mods[name].register_forward_hook(ghook))
                expected = ("backward", name)
                variant = f"module-backward {val}"
        elif kind == "input":
            x.view(-1)[rng.randrange(x.numel())] = val
            expected = ("input", "args[0]")
            variant = f"{val}"
        elif kind == "loss":
            v = rng.choice(["log0", "logsoftmax", "sqrt0"])
            variant = v
            if v == "log0":
                loss_fn = lambda o, t: -torch.log(torch.softmax(o, -1)[torch.arange(len(t)), t] * 0).mean()  # noqa
            elif v == "logsoftmax":
                loss_fn = lambda o, t: -torch.log(torch.softmax(o * 1e5, -1)[torch.arange(len(t)), t]).mean()  # noqa
            else:
                loss_fn = lambda o, t: nn.functional.cross_entropy(o, t) + torch.sqrt(((o - o.detach()) ** 2).sum())  # noqa
            expected = ("loss", "(loss)")
        elif kind == "optimizer":
            pname = rng.choice(params)
            p = dict(model.named_parameters())[pname]
            idx = rng.randrange(10**6)
            fired = []

            key = rng.choice(["exp_avg", "exp_avg_sq"])
            # v = +inf gives a zero update; a negative v gives sqrt(<0) = NaN
            bad = -1.0 if key == "exp_avg_sq" and val == math.inf else val

            def pre(o, a, k):  # corrupt Adam's moment for one element before the update
                if not fired:
                    fired.append(1)
                    with torch.no_grad():
                        o.state[p][key].view(-1)[idx % p.numel()] = bad
            handles.append(opt.register_step_pre_hook(pre))
            expected = ("optimizer", owner(pname))
            variant = f"{key} {bad}"

    if kind == "parameter":
        pname = rng.choice(params)
        with torch.no_grad():
            dict(model.named_parameters())[pname].view(-1)[rng.randrange(10**6) % dict(
                model.named_parameters())[pname].numel()] = val
        expected = ("parameters", owner(pname))
        variant = f"{val}"
        at = 0
    got = None
    try:
        for step in range(at + 4):
            if step == at and kind != "parameter":
                plant()
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            guard.step(loss)
            nf = [f for f in guard.findings if f.kind == "nonfinite"]
            if nf:
                got = (nf[0].origin, nf[0].where)
                break
    except tg.TrainingUnstable:
        nf = [f for f in guard.findings if f.kind == "nonfinite"]
        got = (nf[0].origin, nf[0].where) if nf else None
    finally:
        for h in handles:
            h.remove()
        guard.close()
    return variant, expected, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # correct, triggered, planted
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    misses = []
    for model_name in MODELS:
        for kind in KINDS:
            for seed in range(a.seeds):
                variant, exp, got = run_one(model_name, kind, seed)
                for d, k in ((per_kind, kind), (per_model, model_name)):
                    d[k][2] += 1
                    if got is not None:
                        d[k][1] += 1
                        d[k][0] += int(got == exp)
                if got is not None and got != exp:
                    misses.append((model_name, kind, seed, variant, exp, got))
                if a.verbose:
                    print(model_name, kind, seed, variant, exp, got)
    tot = [sum(v[i] for v in per_kind.values()) for i in range(3)]
    print(f"locate accuracy: {tot[0]}/{tot[1]} triggered injections named correctly "
          f"(origin and module) = {tot[0] / max(tot[1], 1):.1%}; {tot[2]} planted, "
          f"{tot[2] - tot[1]} never became non-finite ({time.perf_counter() - t0:.0f} s)")
    print(f"{'':14s}{'correct':>9s}{'triggered':>11s}{'planted':>9s}")
    for k, (c, t, p) in list(per_kind.items()) + [("--", (0, 0, 0))] + list(per_model.items()):
        if k == "--":
            continue
        print(f"{k:14s}{c:9d}{t:11d}{p:9d}   {c / max(t, 1):.0%}")
    for m in misses:
        print("miss:", *m)


if __name__ == "__main__":
    main()
