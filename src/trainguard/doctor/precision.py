"""Precision audit: can this model train in fp16 / bf16, and which layers must stay fp32?
(research/mechanisms.md §6.1–6.6)

On a fixed probe batch:

1. **Shadow run.** An fp64 copy of the model is the reference. For each format (fp16, bf16)
   the fp32 model is run with every tracked layer's weights rounded to the format and its
   outputs cast ``y.to(fmt).to(float32)`` (storage emulation: overflow becomes inf exactly as
   in the format; accumulation stays fp32, as tensor cores and autocast do). Per layer:
   relative error ‖y − y_ref‖/‖y_ref‖.
2. **One-layer-at-a-time ablation** (§6.6 recipe 2): only layer l is cast; the relative
   error of the model output measures that layer's own sensitivity.
3. **Range.** Per layer amax of the fp64 output and headroom log2(fmt_max/amax).
4. **Gradient underflow.** Fraction of non-zero weight and activation gradients with
   |g| < 2^-24 (flushed to zero in fp16), also after GradScaler's initial scale 2^16.
5. **Update swamping** (§6.6 recipe 4): after one real optimizer step (on a copy), the
   fraction of non-zero updates Δw with Q(w+Δw) == Q(w), Q = rounding to bf16 / fp16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..clone import deepcopy_model
from ..locate._replay import tensor_leaves
from ._common import Batch, LossFn, loss_of, output_and_loss, trainable
from .propagation import tracked_modules

#: Largest finite value of each format (mechanisms.md §6.1).
FORMAT_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38}
#: Unit roundoff u = 2^-(p) with p mantissa bits + 1 (§6.1: fp16 4.9e-4, bf16 3.9e-3).
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
#: Smallest positive fp16 value, 2^-24 = 5.96e-8: smaller gradients flush to zero
#: (Micikevicius 2018, §6.2).
FP16_MIN_SUBNORMAL = 2.0 ** -24
#: GradScaler's initial loss scale 2^16 (PyTorch default, §6.2).
GRADSCALER_INIT = 2.0 ** 16
#: Fraction of gradient values that flush to zero in fp16 above which loss scaling is
#: required: Micikevicius 2018 report ~5 % of a speech model's weight gradients below 2^-24
#: as the reason for loss scaling (§6.2); we flag at 1 % to keep a margin.
UNDERFLOW_FRACTION = 0.01
#: A layer "must stay fp32" when casting it alone makes the model output's relative error
#: exceed SENSITIVITY_FACTOR·√K·u, K its reduction length (fan-in), u the unit roundoff
#: (§6.6 recipe 1: e ≫ √K·u flags ill-conditioning; "≫" taken as 10×, heuristic).
SENSITIVITY_FACTOR = 10.0
#: Headroom (bits) below which a layer is "near overflow": activations routinely grow by
#: more than 16× during training (e.g. §6.3: mt5 activations reaching ~1e4 then inf), so
#: less than 4 bits at initialisation is a warning (heuristic).
HEADROOM_WARN_BITS = 4.0
#: Swamping rate above which pure low-precision weights (no fp32 master copy) lose training
#: signal; §6.4: unit-scale parameters freeze first. Flagged at 10 % (heuristic).
SWAMPING_FRACTION = 0.10

_DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LayerPrecision:
    name: str
    kind: str
    amax: float
    headroom_bits: dict[str, float] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)  # all layers cast, vs fp64
    sensitivity: dict[str, float] = field(default_factory=dict)  # only this layer cast
    limit: dict[str, float] = field(default_factory=dict)  # sensitivity limit
    fan_in: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PrecisionAudit:
    layers: list[LayerPrecision] = field(default_factory=list)
    output_error: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    grad_underflow: dict[str, float] = field(default_factory=dict)
    swamping: dict[str, float] = field(default_factory=dict)
    overflow_layers: dict[str, list[str]] = field(default_factory=dict)
    keep_fp32: dict[str, list[str]] = field(default_factory=dict)
    can_train: dict[str, str] = field(default_factory=dict)  # fmt -> verdict sentence
    grad_amax: float = math.nan
    #: the format of the reference run the errors are measured against: "fp64", or "fp32"
    #: when the model does not run in float64 (a tensor it makes in its forward with the
    #: default dtype, as makemore's bag-of-words ``torch.zeros((B, T, T))``); fp32's own error
    #: (u = 6e-8) is far below the fp16 and bf16 errors measured against it
    reference: str = "fp64"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["layers"] = [lp.to_dict() for lp in self.layers]
        return d


#: the seed of every forward pass of the audit (any fixed value: the runs must only agree)
AUDIT_SEED = 0


def _round(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.to(dt).to(t.dtype)


def _run_collect(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device,
                 dtype: torch.dtype, cast: dict[str, torch.dtype]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
    """Forward with outputs of the layers in ``cast`` rounded through their format;
    returns layer outputs (fp64 copies), the model output and the loss.

    Every run draws the same random numbers (the RNG seeded alike, inside a fork of it), so
    that dropout the doctor cannot switch off keeps the same masks in every run and the
    errors are the format's: nanoGPT's attention passes ``dropout_p`` to
    ``scaled_dot_product_attention`` while its module is in training mode, and at dropout 0.2
    all its 32 layers read as too sensitive for fp16 and for bf16 (the masks of one run
    against another's; ``python bench/nanogpt_trial.py NANOGPT --text CORPUS --doctor 0.2``:
    now none). The masks do not depend on the dtype: the same seed gives fp32 and
    fp64 attention outputs 8e-8 apart."""
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name, m, _ in tracked_modules(model):
        def hook(_m, _i, o, name=name):
            if not isinstance(o, torch.Tensor) or not o.is_floating_point():
                return None
            if name in cast:
                o = _round(o, cast[name])
            if name not in outs:
                outs[name] = o.detach().double()
            return o
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(AUDIT_SEED)
            out, loss_t = output_and_loss(model, loss_fn, batch, device, dtype)
            loss = float(loss_t)
    finally:
        for h in handles:
            h.remove()
    return outs, _flat_output(out), loss


def _flat_output(out: Any) -> torch.Tensor | None:
    """The model's output as one float64 vector: the floating tensors of a tensor, tuple, list
    or dict output (HF ModelOutput), in order; None when it has none. Models that return
    ``(logits, loss)`` (minGPT, makemore) had no output to compare before, so every layer's
    sensitivity read NaN and every layer was called too sensitive for fp16 and bf16."""
    parts = [t.detach().double().flatten() for _, t in tensor_leaves(out) if t.is_floating_point()]
    return torch.cat(parts) if parts else None


def _rel(a: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if a is None or ref is None or a.shape != ref.shape:
        return math.nan
    d = (a - ref)
    if not torch.isfinite(d).all():
        return math.inf
    n = float(ref.norm())
    return float(d.norm()) / n if n > 0 else (0.0 if float(d.norm()) == 0 else math.inf)


def _fan_in(w: Any) -> int:
    """The fan-in of a weight of two or more dimensions (0 for anything else)."""
    return int(w[0].numel()) if isinstance(w, torch.Tensor) and w.dim() >= 2 else 0


def audit(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, batch: Batch,
          device: torch.device, formats: tuple[str, ...] = ("fp16", "bf16"),
          ablation_max_layers: int = 64) -> PrecisionAudit:
    """``model`` and ``opt`` are copies owned by the caller (one optimizer step is taken)."""
    res = PrecisionAudit()
    names = [(n, k) for n, _, k in tracked_modules(model)]
    try:
        ref_outs, ref_out, ref_loss = _run_collect(deepcopy_model(model).double(), loss_fn,
                                                   batch, device, torch.float64, {})
    except RuntimeError as e:  # a dtype the model's forward fixes (see PrecisionAudit.reference)
        res.reference = f"fp32 (the model does not run in float64: {str(e).splitlines()[0][:120]})"
        ref_outs, ref_out, ref_loss = _run_collect(model, loss_fn, batch, device, torch.float32, {})
    res.loss[res.reference[:4]] = ref_loss
    fan = {n: _fan_in(getattr(m, "weight", None)) for n, m, _ in tracked_modules(model)}
    layers = {}
    for n, k in names:
        if n not in ref_outs:
            continue
        amax = float(ref_outs[n].abs().max()) if ref_outs[n].numel() else 0.0
        lp = LayerPrecision(n, k, amax, fan_in=fan.get(n, 0))
        for f in formats:
            lp.headroom_bits[f] = math.log2(FORMAT_MAX[f] / amax) if amax > 0 else math.inf
        layers[n] = lp
    res.layers = list(layers.values())

    params = trainable(model)
    saved = [p.detach().clone() for p in params]
    for f in formats:
        dt = _DT[f]
        with torch.no_grad():
            for p in params:
                p.copy_(_round(p, dt))
        all_cast = {n: dt for n in layers}
        outs, out, loss = _run_collect(model, loss_fn, batch, device, torch.float32, all_cast)
        res.loss[f] = loss
        res.output_error[f] = _rel(out, ref_out)
        res.overflow_layers[f] = [n for n, lp in layers.items() if lp.amax > FORMAT_MAX[f]
                                  or (n in outs and not torch.isfinite(outs[n]).all())]
        for n, lp in layers.items():
            lp.rel_error[f] = _rel(outs[n], ref_outs[n]) if n in outs else math.nan
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        # one-layer-at-a-time ablation (weights of that layer rounded too)
        keep = []
        mods = {n: m for n, m, _ in tracked_modules(model)}
        for n, lp in list(layers.items())[:ablation_max_layers]:
            m = mods.get(n)
            own = [p for p in m.parameters(recurse=False)] if m is not None else []
            own_saved = [p.detach().clone() for p in own]
            with torch.no_grad():
                for p in own:
                    p.copy_(_round(p, dt))
            _, o1, _ = _run_collect(model, loss_fn, batch, device, torch.float32, {n: dt})
            with torch.no_grad():
                for p, s in zip(own, own_saved):
                    p.copy_(s)
            s_err = _rel(o1, ref_out)
            lp.sensitivity[f] = s_err
            K = max(lp.fan_in, 1)
            lp.limit[f] = SENSITIVITY_FACTOR * math.sqrt(K) * UNIT_ROUNDOFF[f]
            if not math.isfinite(s_err) or s_err > lp.limit[f] or n in res.overflow_layers[f]:
                keep.append(n)
        res.keep_fp32[f] = keep

    # gradients (fp32 backward) and one real optimizer step for swamping
    act_grads: list[torch.Tensor] = []
    handles = []
    for _, m, _ in tracked_modules(model):
        def fh(_m, _i, o):
            if isinstance(o, torch.Tensor) and o.requires_grad:
                o.register_hook(lambda g: act_grads.append(g.detach().abs().flatten()))
        handles.append(m.register_forward_hook(fh))
    try:
        opt.zero_grad(set_to_none=True)
        loss_t = loss_of(model, loss_fn, batch, device)
        if math.isfinite(float(loss_t.detach())):
            loss_t.backward()
    finally:
        for h in handles:
            h.remove()
    wg = [p.grad.detach().abs().flatten() for p in params if p.grad is not None]
    allg = torch.cat(wg + act_grads) if (wg or act_grads) else torch.zeros(0)
    nz = allg[allg > 0]
    if nz.numel():
        res.grad_amax = float(nz.max())
        res.grad_underflow["fp16"] = float((nz < FP16_MIN_SUBNORMAL).float().mean())
        scaled = nz * GRADSCALER_INIT
        res.grad_underflow["fp16_scaled"] = float((scaled < FP16_MIN_SUBNORMAL).float().mean())
        res.grad_underflow["fp16_scaled_overflow"] = float((scaled > FORMAT_MAX["fp16"]).float().mean())
        res.grad_underflow["bf16"] = float((nz < 2.0 ** -133).float().mean())
    before = [p.detach().clone() for p in params]
    if all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
        opt.step()
    opt.zero_grad(set_to_none=True)
    for f in formats:
        dt = _DT[f]
        lost, total = 0, 0
        for w0, p in zip(before, params):
            dw = p.detach() - w0
            mask = dw != 0
            moved = int(mask.sum())
            if moved == 0:
                continue
            q0 = w0.to(dt)
            q1 = (w0 + dw).to(dt)
            lost += int(((q0 == q1) & mask).sum())
            total += moved
        res.swamping[f] = lost / total if total else math.nan
    with torch.no_grad():
        for p, s in zip(params, before):
            p.copy_(s)

    for f in formats:
        over = res.overflow_layers.get(f, [])
        keep = res.keep_fp32.get(f, [])
        if f == "fp16":
            uf = res.grad_underflow.get("fp16", 0.0)
            if over:
                res.can_train[f] = (f"no: {len(over)} layer(s) overflow fp16 ({', '.join(over[:3])}"
                                    f"{'...' if len(over) > 3 else ''}); keep them in fp32 or use bf16")
            elif keep:
                res.can_train[f] = (f"with care: keep {len(keep)} sensitive layer(s) in fp32"
                                    + ("; use GradScaler (loss scaling)" if uf > UNDERFLOW_FRACTION else ""))
            elif uf > UNDERFLOW_FRACTION:
                res.can_train[f] = (f"yes with loss scaling: {uf:.1%} of gradients flush to zero "
                                    "without it (torch.amp.GradScaler)")
            else:
                res.can_train[f] = "yes (autocast + GradScaler)"
        else:
            if over:
                res.can_train[f] = f"no: {len(over)} layer(s) overflow bf16"
            elif keep:
                res.can_train[f] = f"with care: keep {len(keep)} sensitive layer(s) in fp32"
            else:
                res.can_train[f] = "yes (autocast; keep fp32 master weights)"
    return res
