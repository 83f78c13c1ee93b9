"""Signal propagation: per-layer forward and backward statistics on a fixed probe batch
(research/mechanisms.md §2.11).

Per tracked layer (every leaf module with parameters, and every activation module), in
forward-call order:

* ``q``        activation second moment mean(h²) of the layer output;
* ``grad_rms`` RMS of the back-propagated gradient ∂L/∂h at the layer output (tensor hook);
* ``dead``     fraction of units that are ≤ 0 for every sample of the probe batch (ReLU kinds;
               smooth ReLU-likes: in their flat negative tail, ``stats.DEAD_TAILS``);
* ``saturated`` fraction of outputs in the flat region (sigmoid: h<0.01 or h>0.99; tanh: |h|>0.99);
* ``gain``     Jacobian gain of the layer, Hutchinson estimate sqrt(E‖Jᵀv‖²/n_in / (‖v‖²/n_out))
  with v ~ N(0, I): 1 for a per-unit isometry, the per-layer χ of mean-field theory (§2.10).

Measured at initialisation and again after a few optimizer steps on a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..detect.units import SMOOTH_KINDS
from ..stats import (_FUNCTIONAL_KINDS, activation_kind, dead_interval, dead_units,
                     functional_dead_interval, unit_dim)
from ..types import Finding
from ._common import Batch, LossFn, loss_of

#: Backward signal ratio ‖∂L/∂h_l‖_rms / ‖∂L/∂h_out‖_rms below which a layer is
#: "vanishing". AUTOTRAINER's tuned default β1 = 1e-3 for the first/last gradient-norm ratio
#: (prior-art-academic.md §1.2; its sensitivity study found 100 % precision/recall across a
#: range of values); mechanisms.md §2.11 suggests ≲1e-4, with healthy nets at 1e-2–1 and a
#: depth-10 sigmoid net at 1e-9 [C]. 1e-3 sits between healthy and broken by a decade.
VANISHING_GRAD_RATIO = 1e-3

#: Backward signal ratio above which a layer is "exploding": AUTOTRAINER's β3 = 70
#: (prior-art-academic.md §1.2, sensitivity range 40–100 with 100 % precision/recall).
EXPLODING_GRAD_RATIO = 70.0

#: Forward second-moment change, in decades, relative to the first layer of the same kind,
#: beyond which activations are collapsing / exploding: "flag if log10(q^L/q^1) outside ±2"
#: (mechanisms.md §2.11, heuristic). Xavier-ReLU at depth 30 gives −9.4 decades, He gives ~0 [C].
Q_DECADES = 2.0

#: Saturated fraction at which a layer is "saturated": more than half of the outputs sit
#: where σ' < 0.0099 (sigmoid) or tanh' < 0.02, i.e. the layer passes on at most about half
#: of its unsaturated gradient signal (heuristic; Glorot 2010 §2.1 describes whole top
#: layers saturating at 0).
SATURATED_FRACTION = 0.5

#: A ReLU layer is "dead" when all its units are inactive on the whole probe batch — the
#: unambiguous signal of mechanisms.md §2.5 — or when its dead fraction rises by at least
#: DEAD_RISE to at least DEAD_AFTER during the first steps ("a dead fraction that increases
#: during training", §2.5). A static ~30 % at depth 30 is a normal He-init baseline [C] and is
#: not flagged.
DEAD_RISE = 0.2
DEAD_AFTER = 0.5
#: DEAD_AFTER for the smooth ReLU-likes (ELU, SiLU, GELU, ...), whose flat tail passes up to 1%
#: of the gradient: a layer can come back from 87% in it (the Guard's
#: ``DeadUnitsDetector.smooth_level``, where the measurement is)
DEAD_AFTER_SMOOTH = 0.9

_SKIP = (nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten)

#: Layers whose output scale is an init choice, not propagation: an embedding's (GPT-2 draws
#: it from N(0, 0.02^2); the LayerNorm after it restores unit scale, and its gradient is
#: ~1/0.02 = 50x the output's through that LayerNorm). Taken as the reference, a healthy
#: GPT-2-style model read as "exploding 3.4 decades" (issue #9). Not judged, never a reference.
EMBEDDING_KINDS = frozenset({"Embedding", "EmbeddingBag"})
#: Layers that set their own output scale (normalisation): never "exploding" or
#: "collapsing" in the forward second-moment test, never its reference.
NORM_KINDS = frozenset({"LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d",
                        "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
                        "LocalResponseNorm"})


@dataclass
class LayerStats:
    name: str
    kind: str  # activation kind ("relu", ...) or module type name ("Linear", ...)
    units: int
    q: float
    grad_rms: float
    dead: float
    saturated: float
    gain: float
    fan_in: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LayerVerdict:
    name: str
    kind: str
    verdict: str  # "vanishing" | "exploding" | "saturated" | "dead" | "collapsing" | "healthy"
    flags: list[str] = field(default_factory=list)
    grad_ratio: float = math.nan
    q_decades: float = math.nan
    init: LayerStats | None = None
    after: LayerStats | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "verdict": self.verdict,
                "flags": list(self.flags), "grad_ratio": self.grad_ratio,
                "q_decades": self.q_decades,
                "init": self.init.to_dict() if self.init else None,
                "after": self.after.to_dict() if self.after else None}


class _FunctionalSpy(torch.overrides.TorchFunctionMode):
    """Sees activations called as functions (``torch.relu(self.fc1(x))``) during the doctor's
    measured forward pass."""

    def __init__(self, on_call: Any) -> None:
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        kind = _FUNCTIONAL_KINDS.get(func)
        if (kind is not None and args and isinstance(args[0], torch.Tensor)
                and isinstance(out, torch.Tensor) and torch.is_grad_enabled()):
            self.on_call(kind, func, args[0], out,
                         functional_dead_interval(kind, args, kwargs or {}))
        return out


def _dead_family(layers: list["LayerVerdict"]) -> str:
    """"ReLU" when every dead layer is a ReLU one, else the activations named (a smooth one's
    units are dead in its flat tail, see :data:`trainguard.stats.DEAD_TAILS`)."""
    kinds = sorted({lv.kind for lv in layers})
    if set(kinds) <= {"relu", "relu6"}:
        return "ReLU"
    return "/".join(kinds)


def _dead_of(lv: Any) -> float:
    st = lv.after or lv.init
    return st.dead if st is not None else math.nan


def tracked_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    out = []
    for name, m in model.named_modules():
        if any(True for _ in m.children()) or isinstance(m, _SKIP):
            continue
        kind = activation_kind(m)
        has_params = any(True for _ in m.parameters(recurse=False))
        if kind is None and not has_params:
            continue
        out.append((name or "(root)", m, kind or type(m).__name__))
    return out


def _fan_in(m: nn.Module, units: int) -> int:
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() >= 2:
        return int(w[0].numel())
    return units


def measure(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device,
            seed: int = 0) -> tuple[list[LayerStats], float]:
    """One forward/backward on ``batch`` with hooks; returns per-layer stats and the loss.
    The model's parameters get .grad populated; the caller works on a copy."""
    targets = tracked_modules(model)
    records: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name: str, mod: nn.Module, kind: str):
        def hook(_m: nn.Module, inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() < 2 or not out.is_floating_point():
                return
            x = inp[0] if isinstance(inp, tuple) and inp else None
            record(name, kind, mod, out, x if isinstance(x, torch.Tensor) else None)
        return hook

    def record(name: str, kind: str, mod: nn.Module | None, out: torch.Tensor,
               x: torch.Tensor | None, functional: bool = False,
               tail: tuple[float, float] | None = None) -> None:
        """One layer's output (and input, for the Jacobian gain); its gradient when it comes."""
        k = counts.get(name, 0)
        counts[name] = k + 1
        rec = {"name": name if k == 0 else f"{name}[{k}]", "kind": kind, "mod": mod, "out": out,
               "inp": x if x is not None and x.requires_grad else None, "grad": None,
               "functional": functional,
               "tail": tail if functional else dead_interval(kind, getattr(mod, "alpha", None))}
        if out.requires_grad:
            def ghook(g: torch.Tensor, rec: dict[str, Any] = rec) -> None:
                rec["grad"] = g.detach()
            out.register_hook(ghook)
        records.append(rec)

    produced: dict[int, str] = {}  # id(module output) -> module name, for functional calls

    def make_named(name: str, hook: Any) -> Any:
        def both(m: nn.Module, inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced[id(out)] = name
            hook(m, inp, out)
        return both

    def functional(kind: str, func: Any, x: torch.Tensor, out: torch.Tensor,
                   tail: tuple[float, float] | None) -> None:
        """An activation called as a function in forward (issue #13): a layer of its own,
        named after the module whose output it was applied to (``fc1.relu``)."""
        if out.dim() < 2 or not out.is_floating_point():
            return
        base = produced.get(id(x), "(root)")
        fname = getattr(func, "__name__", kind).rstrip("_")
        record(f"{base}.{fname}", kind, None, out, x, functional=True, tail=tail)

    for name, m, kind in targets:
        handles.append(m.register_forward_hook(make_named(name, make_hook(name, m, kind))))
    parents = [(n or "(root)", m) for n, m in model.named_modules() if any(True for _ in m.children())]
    for name, m in parents:  # containers' outputs feed functional calls too
        handles.append(m.register_forward_hook(make_named(name, lambda *_: None)))
    try:
        with _FunctionalSpy(functional):
            loss = loss_of(model, loss_fn, batch, device)
    finally:
        for h in handles:
            h.remove()
    # nn.ReLU calls F.relu: the module already recorded that very tensor
    module_outs = {id(r["out"]) for r in records if not r.get("functional")}
    records[:] = [r for r in records if not (r.get("functional") and id(r["out"]) in module_outs)]
    lv = float(loss.detach())
    if loss.requires_grad and math.isfinite(lv):
        loss.backward(retain_graph=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    stats = []
    for rec in records:
        o = rec["out"].detach().float()
        d = unit_dim(o)
        units = int(o.shape[d])
        kind = rec["kind"]
        q = float(o.square().mean())
        tail = rec["tail"]
        dead = float(dead_units(o, d, tail).float().mean()) if tail is not None else math.nan
        if kind in ("sigmoid", "hardsigmoid"):
            sat = float(((o < 0.01) | (o > 0.99)).float().mean())
        elif kind in ("tanh", "hardtanh"):
            sat = float((o.abs() > 0.99).float().mean())
        else:
            sat = math.nan
        g = rec["grad"]
        grad_rms = float(g.float().square().mean().sqrt()) if g is not None else math.nan
        gain = math.nan
        if rec["inp"] is not None and rec["out"].requires_grad:
            v = torch.randn(rec["out"].shape, generator=gen).to(rec["out"].device, rec["out"].dtype)
            try:
                (jt,) = torch.autograd.grad(rec["out"], rec["inp"], v, retain_graph=True,
                                            allow_unused=True)
            except RuntimeError:
                jt = None
            if jt is not None:
                n_out, n_in = v.numel(), jt.numel()
                den = float(v.float().square().sum()) / n_out
                gain = math.sqrt(float(jt.float().square().sum()) / n_in / den) if den > 0 else math.nan
        stats.append(LayerStats(rec["name"], kind, units, q, grad_rms, dead, sat, gain,
                                _fan_in(rec["mod"], units)))
        rec.clear()
    return stats, lv


def _log10(x: float) -> float:
    return math.log10(x) if x > 0 and math.isfinite(x) else (-math.inf if x == 0 else math.nan)


def _persists(init: list[LayerStats], i: int, group: str, q0: float | None, qd: float) -> bool:
    """A second-moment change at layer ``i`` is a propagation fault only if every later
    layer of its group (norms, embeddings and the output layer aside) is past the same limit:
    the signal does not recover. A residual branch's output is small by design (GPT-2 scales
    it by 1/sqrt(2 n_layers); the block sums it into the stream), and the next layer, fed by
    the stream, is back at scale; a deep plain chain's collapse only deepens (issue #9). At
    least one later layer must confirm it (the last hidden layer alone is one layer, not a
    trend)."""
    if q0 is None or not q0 > 0:
        return True
    confirmed = False
    for j in range(i + 1, len(init) - 1):
        t = init[j]
        if t.kind in NORM_KINDS or t.kind in EMBEDDING_KINDS:
            continue
        if ("act" if t.kind.islower() else "param") != group or not t.q > 0:
            continue
        d = _log10(t.q) - _log10(q0)
        if (qd < 0 and d >= -Q_DECADES) or (qd > 0 and d <= Q_DECADES):
            return False
        confirmed = True
    return confirmed


def _unreached_calls(init: list[LayerStats]) -> list[bool]:
    """Per layer: a call of a shared module whose output gets exactly no gradient while
    another call of the same module gets some. No path leads from the loss to that call's
    output (it is multiplied by zero), which is not a gradient shrinking on the way: a
    vanishing gradient is a product of small Jacobians, small and not zero. karpathy/makemore's
    GRU computes its reset gate first, on the zero initial state, so the gate's call at the
    first position gets no gradient at all and its later calls healthy ones; it was called
    vanishing, with prescriptions to re-initialise (2 of 98 layers; ``python
    bench/makemore_trial.py MAKEMORE --doctor --types gru``: none now). Only shared modules:
    an unshared layer with no gradient (below a layer whose units are all dead) keeps its
    verdict."""
    def base(name: str) -> str:
        return name[:name.rindex("[")] if name.endswith("]") and "[" in name else name
    calls: dict[str, int] = {}
    reached: set[str] = set()
    for s in init:
        b = base(s.name)
        calls[b] = calls.get(b, 0) + 1
        if s.grad_rms > 0:
            reached.add(b)
    return [s.grad_rms == 0 and calls[base(s.name)] > 1 and base(s.name) in reached for s in init]


def _sustained_vanishing(init: list[LayerStats], ratios: list[float]) -> list[bool]:
    """Per layer: a gradient below ``VANISHING_GRAD_RATIO`` here is a vanishing gradient only
    if it stays below on the way back to the input: every earlier layer (forward order;
    embeddings and norms aside, whose outputs span every position of a sequence) is below it
    too. A gradient that shrinks through depth does not recover towards the input in a plain
    chain (the deep sigmoid and Xavier-ReLU nets vanish from some layer down to the first), nor
    through time in an RNN whose loss sits at the end (its first positions vanish); a small
    gradient with healthy ones before it is a layer the loss reaches little, not a signal lost
    on the way: karpathy/makemore's RNN and GRU, unrolled over 16 positions whose late ones are
    padding that ``ignore_index`` leaves out of the loss, had their last cell calls called
    vanishing, with prescriptions to re-initialise (10 of 34 and 33 of 98 layers; now 0 and 2,
    ``python bench/makemore_trial.py MAKEMORE --doctor --types rnn,gru``: the GRU's reset gate
    at the first position multiplies the zero initial state and gets no gradient at all, the
    same picture as a first position lost through time, now set aside by
    :func:`_unreached_calls`)."""
    out = []
    below = True  # every earlier counted layer is below the limit
    for s, r, unreached in zip(init, ratios, _unreached_calls(init)):
        out.append(below and not unreached)
        if s.kind not in EMBEDDING_KINDS and s.kind not in NORM_KINDS and not unreached and (
                math.isfinite(r) or r == 0):
            below = below and r < VANISHING_GRAD_RATIO
    return out


def verdicts(init: list[LayerStats], after: list[LayerStats] | None) -> list[LayerVerdict]:
    """Per-layer verdict from the init measurement (and the after-steps one when given)."""
    after_by = {s.name: s for s in (after or [])}
    out: list[LayerVerdict] = []
    if not init:
        return out
    ref_grad = next((s.grad_rms for s in reversed(init) if math.isfinite(s.grad_rms) and s.grad_rms > 0),
                    math.nan)
    first_q: dict[str, float] = {}
    ratios = [s.grad_rms / ref_grad if math.isfinite(ref_grad) and ref_grad > 0 else math.nan
              for s in init]
    sustained = _sustained_vanishing(init, ratios)
    for i, s in enumerate(init):
        a = after_by.get(s.name)
        flags: list[str] = []
        ratio = ratios[i]
        if s.kind in EMBEDDING_KINDS and math.isfinite(s.q) and math.isfinite(s.grad_rms):
            out.append(LayerVerdict(s.name, s.kind, "healthy", [], ratio, math.nan, s, a))
            continue
        if math.isfinite(ratio) or ratio == 0:
            if ratio < VANISHING_GRAD_RATIO and sustained[i]:
                flags.append("vanishing")
            elif ratio > EXPLODING_GRAD_RATIO:
                flags.append("exploding")
        group = "act" if s.kind.islower() else "param"
        if s.kind in NORM_KINDS:
            qd = math.nan  # its scale is its affine weight's, by construction
        else:
            q0 = first_q.setdefault(group, s.q)
            qd = _log10(s.q) - _log10(q0) if q0 > 0 else math.nan
        is_last = i == len(init) - 1
        if not is_last and (math.isfinite(qd) or qd == -math.inf) and _persists(init, i, group, first_q.get(group), qd):
            if qd < -Q_DECADES:
                flags.append("collapsing")
            elif qd > Q_DECADES:
                flags.append("exploding")
        if not math.isfinite(s.q) or (math.isfinite(s.grad_rms) is False and s.grad_rms == s.grad_rms):
            flags.append("exploding")
        sat = max(s.saturated if math.isfinite(s.saturated) else 0.0,
                  a.saturated if a is not None and math.isfinite(a.saturated) else 0.0)
        if sat >= SATURATED_FRACTION:
            flags.append("saturated")
        if math.isfinite(s.dead):
            d_after = a.dead if a is not None and math.isfinite(a.dead) else s.dead
            bar = DEAD_AFTER_SMOOTH if s.kind in SMOOTH_KINDS else DEAD_AFTER
            if s.dead >= 1.0 or d_after >= 1.0 or (d_after - s.dead >= DEAD_RISE and d_after >= bar):
                flags.append("dead")
        order = ("dead", "saturated", "exploding", "vanishing", "collapsing")
        verdict = next((f for f in order if f in flags), "healthy")
        out.append(LayerVerdict(s.name, s.kind, verdict, sorted(set(flags), key=order.index),
                                ratio, qd, s, a))
    return out


def findings_from(layers: list[LayerVerdict], model: nn.Module) -> list[Finding]:
    """Aggregate the per-layer verdicts into Guard-kind (and doctor-only) findings."""
    fs: list[Finding] = []
    acts = sorted({lv.kind for lv in layers if lv.kind.islower()})

    def where_all(flag: str) -> list[LayerVerdict]:
        return [lv for lv in layers if flag in lv.flags]

    van = [lv for lv in where_all("vanishing")]
    if van:
        worst = min(van, key=lambda lv: lv.grad_ratio)
        chi = _chi(layers)
        fs.append(Finding(
            "vanishing_gradient", 0,
            f"the back-propagated gradient at {worst.name} is {worst.grad_ratio:.2g}× the one at "
            f"the output ({len(van)} of {len(layers)} layers below {VANISHING_GRAD_RATIO:g}); "
            f"activations: {', '.join(acts) or 'none'}",
            where=van[0].name, locations=tuple(lv.name for lv in van), severity="error",
            evidence={"min_grad_ratio": worst.grad_ratio, "layers": len(van),
                      "chi_per_layer": chi, "activations": acts}))
    # the last weight layer of a residual branch is small by design (Fixup/ReZero zero-init;
    # its output is added to the residual stream), so its own q is not a collapse signal
    branch_ends = set()
    for bname, block in residual_blocks(model):
        ws = [n for n, c in block.named_modules() if isinstance(c, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if ws:
            branch_ends.add(f"{bname}.{ws[-1]}")
    col = [lv for lv in where_all("collapsing") if lv.name.split("[")[0] not in branch_ends]
    if col:
        worst = min(col, key=lambda lv: lv.q_decades)
        fs.append(Finding(
            "activation_collapse", 0,
            f"activation second moment falls {-worst.q_decades:.1f} decades from the first layer to "
            f"{worst.name} (limit {Q_DECADES:g}): the forward signal dies with depth",
            where=col[0].name, locations=tuple(lv.name for lv in col), severity="error",
            evidence={"q_decades": worst.q_decades, "activations": acts,
                      "chi_per_layer": _chi(layers)},
            remedies=("use He init for ReLU, Xavier for tanh/sigmoid (or LSUV)",
                      "add normalisation (BatchNorm/LayerNorm)")))
    exq = [lv for lv in layers if "exploding" in lv.flags and math.isfinite(lv.q_decades)
           and lv.q_decades > Q_DECADES]
    if exq:
        worst = max(exq, key=lambda lv: lv.q_decades)
        fs.append(Finding(
            "activation_explosion", 0,
            f"activation second moment grows {worst.q_decades:.1f} decades from the first layer to "
            f"{worst.name} (limit {Q_DECADES:g})",
            where=exq[0].name, locations=tuple(lv.name for lv in exq), severity="error",
            evidence={"q_decades": worst.q_decades, "residual_blocks": len(residual_blocks(model))},
            remedies=("zero-init the last layer of each residual branch (Fixup/ReZero)",
                      "add normalisation (pre-LN / BatchNorm)",
                      "scale residual branches by L^-1/2 (Fixup)")))
    exg = [lv for lv in layers if "exploding" in lv.flags and math.isfinite(lv.grad_ratio)
           and lv.grad_ratio > EXPLODING_GRAD_RATIO]
    if exg:
        worst = max(exg, key=lambda lv: lv.grad_ratio)
        fs.append(Finding(
            "grad_explosion", 0,
            f"the back-propagated gradient at {worst.name} is {worst.grad_ratio:.2g}× the one at "
            f"the output (limit {EXPLODING_GRAD_RATIO:g})",
            where=exg[0].name, locations=tuple(lv.name for lv in exg), severity="error",
            evidence={"max_grad_ratio": worst.grad_ratio, "chi_per_layer": _chi(layers)}))
    dead = where_all("dead")
    if dead:
        full = [lv for lv in dead if (lv.init and lv.init.dead >= 1.0) or (lv.after and lv.after.dead >= 1.0)]
        widths = sorted({lv.init.units for lv in dead if lv.init})
        fs.append(Finding(
            "dead_units", 0,
            f"{len(dead)} {_dead_family(dead)} layer(s) dead on the whole probe batch"
            + (f" ({len(full)} 100 % dead: the network output is constant past them)" if full else "")
            + (f"; layer widths {widths}" if widths else ""),
            where=dead[0].name, locations=tuple(lv.name for lv in dead), severity="error",
            evidence={"dead_fraction": {lv.name: _dead_of(lv) for lv in dead},
                      "activations": sorted({lv.kind for lv in dead}),
                      "widths": widths, "fully_dead": [lv.name for lv in full]}))
    sat = where_all("saturated")
    if sat:
        fs.append(Finding(
            "saturation", 0,
            f"{len(sat)} layer(s) have ≥{SATURATED_FRACTION:.0%} of outputs in the flat region of "
            f"the activation",
            where=sat[0].name, locations=tuple(lv.name for lv in sat), severity="warning",
            evidence={"saturated_fraction": {lv.name: max(
                x for x in ((lv.init.saturated if lv.init else 0.0),
                            (lv.after.saturated if lv.after else 0.0)) if math.isfinite(x))
                for lv in sat}}))
    return fs


def _chi(layers: list[LayerVerdict]) -> float:
    """Geometric-mean backward gain per tracked layer (output → first layer): the empirical
    χ of mean-field theory (<1 ordered / vanishing, >1 chaotic / exploding, §2.10). A
    Linear+activation pair counts as two tracked layers, so χ₁ per block is its square."""
    rs = [lv.grad_ratio for lv in layers if math.isfinite(lv.grad_ratio) and lv.grad_ratio > 0]
    if len(rs) < 2:
        return math.nan
    return float(rs[0] ** (1.0 / max(1, len(rs) - 1)))


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """User-defined submodules (not torch.nn built-ins, not the root) that contain at least
    two Linear/Conv layers: candidate residual blocks for Fixup-style zero init."""
    out = []
    for name, m in model.named_modules():
        if not name or type(m).__module__.startswith("torch."):
            continue
        lin = [c for c in m.modules() if isinstance(c, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if len(lin) >= 2:
            out.append((name, m))
    # innermost only
    names = [n for n, _ in out]
    found = [(n, m) for n, m in out if not any(o != n and o.startswith(n + ".") for o in names)]
    return found or traced_residual_branches(model)


def traced_residual_branches(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Branches ``f`` of ``h + f(h)`` found by tracing ``forward`` with torch.fx (a residual
    net built from nn.Sequential branches in a ModuleList, which the user-module rule above
    cannot see). [] when the model does not trace."""
    import operator

    import torch.fx as fx
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow, custom types: no answer
        return []
    mods = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        is_add = ((node.op == "call_function" and node.target in (operator.add, operator.iadd,
                                                                  torch.add))
                  or (node.op == "call_method" and node.target in ("add", "add_")))
        if not is_add or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        for x, y in ((a, b), (b, a)):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                continue
            # walk the branch back from x along first arguments until it reaches y (the
            # traced graph inlines nn.Sequential: the branch is a chain of leaf calls)
            path, cur = [], x
            for _ in range(32):
                if cur is y or cur.op not in ("call_module", "call_function", "call_method") \
                        or not cur.args or not isinstance(cur.args[0], fx.Node):
                    break
                if cur.op == "call_module":
                    path.append(str(cur.target))
                cur = cur.args[0]
            if cur is not y:
                continue
            weighted = [t for t in path if isinstance(mods.get(t), _WEIGHTED_TYPES)]
            if weighted:  # the branch's last weighted layer (path runs backwards)
                out[weighted[0]] = mods[weighted[0]]
    return list(out.items())


_WEIGHTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
