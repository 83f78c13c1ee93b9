"""The probe: the only code that reads tensors on every step.

Per step, on the device, with fused foreach kernels: the loss, every gradient's L2 norm
(``torch._foreach_norm``) and every parameter's L2 norm, stacked into one vector and moved
to the host in **one** transfer. Non-finite values show up as non-finite norms, so no extra
``isfinite`` pass is needed. Grouping per module, the global norm and all decisions happen
on the host with numpy over a few hundred floats.

On sampled steps (every ``sample_every`` steps, and the first) forward hooks on activation
modules add per-layer dead/saturated fractions and activation second moments to the same
vector, and a parameter copy taken before the update gives the update-to-weight ratio.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence, cast

import numpy as np
import torch
from torch import nn

from .names import clean_name
from .types import StepStats

_ACTIVATION_KINDS: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Hardtanh: "hardtanh", nn.Hardsigmoid: "hardsigmoid", nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu", nn.ELU: "elu", nn.SELU: "selu", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.CELU: "celu", nn.Softplus: "softplus", nn.Mish: "mish",
}


def activation_kind(module: nn.Module) -> str | None:
    """The activation family of a module (``"relu"``, ``"tanh"``, ...) or None."""
    for cls in type(module).__mro__:
        if cls in _ACTIVATION_KINDS:
            return _ACTIVATION_KINDS[cls]
    return None


def unit_dim(t: torch.Tensor) -> int:
    """The dimension that indexes units: features for (N, C) and (N, T, C), channels for
    (N, C, H, W) and (N, C, D, H, W)."""
    return 1 if t.dim() in (2, 4, 5) else t.dim() - 1


_DEAD_KINDS = ("relu", "relu6")
_SAT_KINDS = {"sigmoid": 0.5, "hardsigmoid": 0.5, "tanh": 0.0, "hardtanh": 0.0}  # -> centre

#: a unit of a smooth ReLU-like activation is dead when its slope is below this share of the
#: linear part's on every row: the flat negative tail, where ELU, SELU, CELU, SiLU, GELU and
#: Mish pass under 1% of the gradient a ReLU's live side passes (a ReLU's dead side passes
#: none). Measured on DDPM denoisers (SiLU MLPs, Adam at 10-30x their working LR,
#: ``python bench/diffusion_trial.py --observe``): in every run whose loss then sat at 1.0 for
#: good (the network predicting zero noise) the last SiLU layer was 92-100% in that tail at
#: the first probe after the kill. Softplus is left out: it is
#: mostly a positivity transform on an output (a predicted standard deviation,
#: ``softplus(raw) + eps``), and a confident model's standard deviation below 0.01 puts its
#: pre-activation in that tail (softplus(x) < 0.01 iff x < -4.6), a good fit, not a dead layer.
DEAD_SLOPE = 0.01
#: the output interval (lo, hi) of those dead tails at the default parameters; a unit is dead
#: when all its outputs lie in it. ELU/CELU (alpha=1): slope e^x < 1% iff x < ln 0.01, output
#: alpha * (0.01 / alpha - 1) = 0.01 - alpha (ELU), alpha * (0.01 - 1) (CELU); SELU: the same
#: with lambda = 1.0507 and alpha = 1.6733, lambda * (0.01 - alpha); SiLU and Mish (slope below 1% for
#: x < -6.26, output x * sigmoid(x) >= -0.01193) and GELU (x < -3.07, output >= -0.00331): their
#: tails rise back to 0 from below, so a unit is dead when every output lies in [lo, 0]. The
#: same interval holds a unit whose pre-activation sits within 0.024 (SiLU, Mish) or 0.007
#: (GELU) of 0 on every row, alive there: only a unit with all-zero weights and bias does that.
#: Leaky ReLU and PReLU keep a fixed negative slope (the remedy for dying units): never dead.
DEAD_TAILS: dict[str, tuple[float, float]] = {
    "elu": (-math.inf, 0.01 - 1.0), "celu": (-math.inf, -0.99),
    "selu": (-math.inf, 1.0507009873554805 * (0.01 - 1.6732632423543772)),
    "silu": (-0.01193, 0.0), "mish": (-0.01193, 0.0), "gelu": (-0.00331, 0.0),
}


def dead_interval(kind: str, alpha: Any = None) -> tuple[float, float] | None:
    """The output interval in which a unit of this activation is dead on every row (ReLU
    families: (-inf, 0]; the smooth ones: :data:`DEAD_TAILS`, with ELU's and CELU's ``alpha``
    when given: a module's attribute, a functional call's argument), or None (no dead state)."""
    if kind in _DEAD_KINDS:
        return (-math.inf, 0.0)
    if kind in ("elu", "celu") and isinstance(alpha, (int, float)) and alpha > 0:
        return (-math.inf, 0.01 - alpha if kind == "elu" else -0.99 * alpha)
    return DEAD_TAILS.get(kind)


def dead_units(o: torch.Tensor, d: int, interval: tuple[float, float]) -> torch.Tensor:
    """Per unit (dimension ``d`` of ``o``): all its outputs lie in ``interval`` (a bool tensor):
    the unit is dead on the whole batch (:func:`dead_interval`). Reductions only: no temporary
    the size of ``o`` (a GPT's MLP activation on a sampled step is tens of MB)."""
    lo, hi = interval
    dims = [i for i in range(o.dim()) if i != d]
    if lo == -math.inf:
        return o.amax(dim=dims) <= hi
    return (o.amax(dim=dims) <= hi) & (o.amin(dim=dims) >= lo)


def _activation_parts(kind: str, out: torch.Tensor, dead: tuple[float, float] | None = None
                      ) -> tuple[list[torch.Tensor], "_Layout"]:
    """The device scalars one activation's statistics are made of, and how the host turns
    them into [dead_fraction, saturated_fraction, second_moment, units] (:class:`_Layout`).
    Counts and a sum of squares are computed on the device — a count of units dead on every
    row (``dead``, the interval of :func:`dead_interval`: ReLU families' maximum <= 0, smooth
    ReLU-likes in their flat tail), a count of saturated elements (sigmoid, tanh families), the sum of
    squares accumulated in fp32 (fp64 for float64 outputs) — and divided on the host, so a
    module costs 2-5 small device ops on a sampled step and no constant tensors (issue #15:
    the 13 ops and three ``torch.tensor`` constants per module it used to take were most of
    a sampled step's cost on a model with hundreds of activations). Nothing is copied to
    fp32 (on a 98M-parameter GPT in bf16 the copies of twelve MLP activations cost ~25 ms
    per sampled step)."""
    o = out.detach()
    if o.dim() < 2 or o.numel() == 0:
        return [], _Layout(False, False, 0, 0)
    d = unit_dim(o)
    units = o.shape[d]
    acc = torch.float64 if o.dtype == torch.float64 else torch.float32
    parts: list[torch.Tensor] = []
    if dead is not None:
        parts.append(dead_units(o, d, dead).sum())
    sat = kind in _SAT_KINDS
    if sat and _SAT_KINDS[kind]:  # sigmoid families: centred on 0.5
        parts.append(((o < 0.01) | (o > 0.99)).sum())
    elif sat:
        parts.append((o.abs() > 0.99).sum())
    parts.append(torch.linalg.vector_norm(o, dtype=acc).square())
    return parts, _Layout(dead is not None, sat, units, o.numel())


#: the activations read in a batch (below): tanh and sigmoid, whose outputs autograd keeps
#: for the backward pass anyway (so holding them costs no memory, and writing one in place
#: before the backward is an autograd error in the user's own run). The others are read in
#: their hook: ReLU families need a per-unit maximum (no fused form), and GELU, SiLU and the
#: like keep their input, not their output, so a later in-place write would be legal.
_BATCHED_KINDS = ("tanh", "sigmoid")
#: tanh and sigmoid outputs of at most this many elements are read together after the forward
#: pass, in a few fused (``torch._foreach_*``) calls, instead of 5 small ops each inside their
#: hook: below this size the per-call cost dominates (499 tanh outputs of 32x16 on this CPU:
#: 27.5 ms read one by one, 11.5 ms batched, ``python bench/sampled_step.py``; issue #15).
#: Larger ones are read in their hook, where the ops cost bandwidth, not calls.
BATCH_NUMEL = 65536
#: the batched activations are referenced (not copied) until the step is measured: at most
#: this many bytes of them (autograd keeps them until the backward pass anyway; this bounds
#: what is held past it, until the Guard's step)
BATCH_BYTES = 32 * 2**20


def _batched_parts(items: list[tuple[torch.Tensor, str, list[torch.Tensor]]]) -> None:
    """Fill each item's parts ([saturated count,] sum of squares; see
    :func:`_activation_parts`) for tensors of one device and dtype, in fused calls: the sum
    of squares from ``_foreach_norm`` (fp32 accumulation for 16-bit outputs), the saturated
    count as the L1 norm of ``sign(max(|o - centre| - half_width, 0))`` (tanh: |o| > 0.99;
    sigmoid: |o - 0.5| > 0.49, i.e. o < 0.01 or o > 0.99). A NaN in the activation makes
    that count NaN (reported as unknown, where the one-by-one read ignored the NaN)."""
    ts = [t for t, _k, _p in items]
    kw = {} if ts[0].dtype in (torch.float32, torch.float64) else {"dtype": torch.float32}
    norms = torch._foreach_norm(ts, 2, **kw)
    sq = torch._foreach_mul(norms, norms)
    sat = [i for i, (_t, k, _p) in enumerate(items) if k in _SAT_KINDS]
    counts: dict[int, torch.Tensor] = {}
    if sat:
        centres = [_SAT_KINDS[items[i][1]] for i in sat]
        a = torch._foreach_sub([ts[i] for i in sat], centres)
        torch._foreach_abs_(a)
        torch._foreach_sub_(a, [0.99 if c == 0.0 else 0.49 for c in centres])
        torch._foreach_clamp_min_(a, 0.0)
        torch._foreach_sign_(a)
        counts = dict(zip(sat, torch._foreach_norm(a, 1, **kw)))
    for i, (_t, _k, parts) in enumerate(items):
        if i in counts:
            parts.append(counts[i])
        parts.append(sq[i])


class _Layout:
    """How an activation's device scalars (see :func:`_activation_parts`) become
    [dead_fraction, saturated_fraction, second_moment, units] on the host; ``vector`` entries
    (softmax, logits, recurrent) are already that 4-vector."""

    __slots__ = ("dead", "sat", "units", "numel", "size")

    def __init__(self, dead: bool, sat: bool, units: int, numel: int) -> None:
        self.dead, self.sat, self.units, self.numel = dead, sat, units, numel
        self.size = (dead + sat + 1) if numel else 0

    def finish(self, v: Sequence[float]) -> tuple[float, float, float, float]:
        if not self.numel:
            return math.nan, math.nan, math.nan, 0.0
        i = 0
        dead = sat = math.nan
        if self.dead:
            dead, i = v[0] / self.units, 1
        if self.sat:
            sat, i = v[i] / self.numel, i + 1
        return dead, sat, v[i] / self.numel, float(self.units)


class SampledActivations:
    """One sampled forward pass's statistics: ``values`` (one device vector, or None) and the
    host's reading of it (:meth:`unpack`)."""

    def __init__(self, entries: dict[str, tuple[str, list[torch.Tensor], "_Layout | None"]]
                 ) -> None:
        self.kinds = {n: k for n, (k, _p, _l) in entries.items()}
        self._entries = [(n, lay) for n, (_k, _p, lay) in entries.items()]
        #: name -> the rows (samples x positions) each unit of a ReLU-family output was seen
        #: on: a unit silent on few rows may only be selective (``DeadUnitsDetector.min_rows``)
        self.rows = {n: lay.numel // lay.units for n, lay in self._entries
                     if lay is not None and lay.dead and lay.units}
        scalars = [t for _k, p, lay in entries.values() if lay is not None for t in p]
        vectors = [p[0] for _k, p, lay in entries.values() if lay is None]
        parts = ([torch.stack(scalars)] if scalars else []) + vectors
        if len({t.device for t in parts}) > 1:
            parts = [t.to(parts[0].device) for t in parts]
        self.values: torch.Tensor | None = (torch.cat(parts) if len(parts) > 1 else
                                            parts[0] if parts else None)
        self.size = 0 if self.values is None else int(self.values.numel())

    def __len__(self) -> int:
        return len(self._entries)

    def unpack(self, vals: np.ndarray) -> dict[str, tuple[str, tuple[float, float, float, float]]]:
        """name -> (kind, (dead, saturated, second moment or softmax/logit value, units))."""
        out: dict[str, tuple[str, tuple[float, float, float, float]]] = {}
        nscal = sum(lay.size for _n, lay in self._entries if lay is not None)
        i, j = 0, nscal
        for n, lay in self._entries:
            if lay is None:
                a, b, c, d = (float(x) for x in vals[j:j + 4])
                out[n] = (self.kinds[n], (a, b, c, d))
                j += 4
            else:
                out[n] = (self.kinds[n], lay.finish([float(x) for x in vals[i:i + lay.size]]))
                i += lay.size
        return out


def _softmax_stats(x: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Attention-shaped softmax inputs (ndim >= 3, last two dims equal: query x key):
    [nan, fraction of rows that are one-hot (max prob > 0.99, rows with >= 2 keys),
    max |logit|, rows]. Other softmaxes (a classifier's output) return None."""
    if x.dim() < 3 or x.shape[-1] != x.shape[-2] or dim not in (-1, x.dim() - 1):
        return None
    xf = x.detach().float()
    p = torch.softmax(xf, dim=-1)
    valid = torch.isfinite(xf).sum(-1) >= 2  # rows with two or more unmasked keys
    onehot = (p.amax(-1) > 0.99) & valid
    nv = valid.sum()
    frac = torch.where(nv > 0, onehot.sum() / nv.clamp_min(1), torch.tensor(math.nan, device=x.device))
    fin = torch.isfinite(xf)
    maxlogit = torch.where(fin, xf, torch.zeros_like(xf)).abs().amax()
    return torch.stack([torch.tensor(math.nan, device=x.device), frac.float(), maxlogit,
                        nv.float()])


def _logit_stats(out: Any) -> torch.Tensor | None:
    """The model's output when it looks like logits (floating, 2 or 3 dimensions, last >= 2):
    [nan, nan, mean log Z per row (logsumexp over the last dimension, in fp32), V]; else None
    (see :mod:`trainguard.detect.logits`)."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() \
            or out.dim() not in (2, 3) or out.shape[-1] < 2 or out.numel() == 0:
        return None
    with torch.no_grad():
        lz = torch.logsumexp(out.detach().float(), dim=-1).mean()
        nan = torch.tensor(math.nan, device=out.device)
        return torch.stack([nan, nan, lz, torch.tensor(float(out.shape[-1]), device=out.device)])


class _SoftmaxSpy(torch.overrides.TorchFunctionMode):
    """Sees every softmax call of one forward pass (sampled steps only)."""

    def __init__(self, sampler: "ActivationSampler") -> None:
        super().__init__()
        self.sampler = sampler

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
            return out
        if func in _SOFTMAX_FUNCS:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
            if isinstance(dim, int):
                # torch calls made here do not re-enter the mode (it is off inside its handler)
                self.sampler._softmax(args[0], dim)
        else:
            kind = _FUNCTIONAL_KINDS.get(func)
            if kind is not None and isinstance(out, torch.Tensor):
                self.sampler._functional(kind, func, args[0], out,
                                         functional_dead_interval(kind, args, kwargs))
        return out


def functional_dead_interval(kind: str, args: tuple, kwargs: dict) -> tuple[float, float] | None:
    """:func:`dead_interval` for a functional call: ``F.elu(x, alpha)``, ``F.celu(x, alpha)``
    (the second argument or the keyword)."""
    return dead_interval(kind, kwargs.get("alpha", args[1] if len(args) > 1 else None))


_stack_len = getattr(torch._C, "_len_torch_function_stack", None)
_stack_at = getattr(torch._C, "_get_function_stack_at", None)

_SOFTMAX_FUNCS = {torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}

_F = torch.nn.functional
#: activations called as functions inside ``forward`` (issue #13: a large share of published
#: models write ``torch.relu(self.fc1(x))``), by the family their statistics use
_FUNCTIONAL_KINDS: dict[Any, str] = {
    **{f: "relu" for f in (torch.relu, torch.relu_, _F.relu, _F.relu_, torch.Tensor.relu,
                           torch.Tensor.relu_)},
    _F.relu6: "relu6",
    **{f: "sigmoid" for f in (torch.sigmoid, torch.sigmoid_, _F.sigmoid, torch.Tensor.sigmoid,
                              torch.Tensor.sigmoid_)},
    **{f: "tanh" for f in (torch.tanh, torch.tanh_, _F.tanh, torch.Tensor.tanh,
                           torch.Tensor.tanh_)},
    _F.hardtanh: "hardtanh", _F.hardsigmoid: "hardsigmoid", _F.gelu: "gelu", _F.silu: "silu",
    _F.leaky_relu: "leaky_relu", _F.elu: "elu", _F.selu: "selu", torch.selu: "selu",
    _F.celu: "celu", _F.softplus: "softplus", _F.mish: "mish",
}


#: functional activations and attention softmaxes are looked for (the spy mode and two
#: process-wide module hooks) on the first sampled pass and on every ``LOOK_EVERY``-th one after
#: it; while the last look found none, the passes between skip that machinery. Registered, a
#: process-wide hook sends every module call through PyTorch's slow path: on a model of 1,500
#: modules that and the spy were ~45 ms of a ~70 ms sampled-step cost (issue #15). Ten: a
#: functional call that first appears mid-run is seen within ten samples (500 steps at the
#: default ``sample_every``); a model that has one is looked at on every pass.
LOOK_EVERY = 10


def is_compiled(model: nn.Module) -> bool:
    """The model, or one of its modules, runs under ``torch.compile``: an ``OptimizedModule``
    (``torch.compile(model)``) or a module compiled in place (``Module.compile()``)."""
    return any(type(m).__name__ == "OptimizedModule"
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


class ActivationSampler:
    """Forward hooks on activation modules (and a softmax spy for attention), armed only for
    the next forward pass.

    Under ``torch.compile`` no hook is armed: dynamo guards on a module's hooks (and on the
    process-wide ones), so each armed pass recompiled the model, and after 8 recompiles
    (``torch._dynamo.config.recompile_limit``) dynamo ran that code eagerly for the rest of
    training (nanoGPT's default ``compile=True``: after 8 sampled steps, 400 at the default
    ``sample_every``). A compiled model is recognised when the Guard is built
    (:func:`is_compiled`) or at its first armed pass that dynamo traces; its sampled steps then
    measure no activation (dead units, saturation, attention and output logits) but keep the
    rest (update-to-weight ratios, optimizer state): a hook-less arm (:attr:`hookless_armed`)
    that the step probe reads as a sampled step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        #: torch.compile in the way: arm no hook (see the class docstring)
        self.compiled = is_compiled(model)
        #: armed without hooks (a compiled model): the next step is a sampled one all the same
        self.hookless_armed = False
        self.targets = [(clean_name(name, ""), m, k) for name, m in model.named_modules()
                        if (k := activation_kind(m)) is not None]
        self.recurrent = [(clean_name(name, ""), m) for name, m in model.named_modules()
                          if isinstance(m, nn.RNNBase)]
        self._handles: list[Any] = []
        #: name -> (kind, device scalars, layout); layout None: the scalars are one 4-vector
        self.results: dict[str, tuple[str, list[torch.Tensor], _Layout | None]] = {}
        self._stack: list[str] = []
        self._spy: _SoftmaxSpy | None = None
        self._in_spy = False
        self._name_of: dict[int, str] | None = None  # id(module) -> name, built at the first arm
        self._target_names: set[str] = set()
        self._produced: dict[int, str] = {}  # id(output tensor) -> module, this forward only
        #: activations held for the batched read: (key, kind, tensor, version, parts to fill)
        self._pending: list[tuple[str, str, torch.Tensor, int, list[torch.Tensor]]] = []
        self._held = 0  # their bytes
        self._passes = 0  # armed passes, for LOOK_EVERY
        self._look = True  # this pass looks for functional calls (spy + process-wide hooks)
        self._found = True  # the last look found one (so the first pass looks)
        self._seen = False  # this pass recorded a functional activation or a softmax
        self._ran = False  # the root's forward ran since the last arm

    def refresh(self) -> None:
        """The model's modules changed (a structural repair swapped activations): find the
        targets again."""
        was_armed = bool(self._handles)
        self.disarm()
        self.targets = [(clean_name(name, ""), m, k) for name, m in self.model.named_modules()
                        if (k := activation_kind(m)) is not None]
        self.recurrent = [(clean_name(name, ""), m) for name, m in self.model.named_modules()
                          if isinstance(m, nn.RNNBase)]
        self._name_of = None
        self.results = {}
        self._pending, self._held = [], 0
        self._found, self._passes = True, 0  # look again at the changed model
        if was_armed:
            self.arm()

    def arm(self) -> None:
        """Listen to the next forward pass: a forward hook on each activation module (their
        statistics), and two process-wide module hooks (``register_module_forward_pre_hook`` /
        ``register_module_forward_hook``) that keep the stack of running modules and who
        produced which tensor, for softmax and functional activations, through a dict lookup
        (they used to be two hooks on *every* module: 0.2 s to arm on a 1,500-module model).
        Nothing is stored on the user's modules that ``torch.save`` or ``copy.deepcopy`` would
        carry. A compiled model gets no hooks at all (a hook-less arm, see the class
        docstring); on the one pass that finds it compiled (traced by dynamo), the process-wide
        hooks and the spy stand aside. The spy and the process-wide
        hooks are armed only on the passes that look for functional calls (:data:`LOOK_EVERY`)."""
        if self._handles or self.hookless_armed:
            return
        if self.compiled:
            self.hookless_armed = True
            return
        self.results = {}
        self._pending, self._held = [], 0
        self._look = self._found or self._passes % LOOK_EVERY == 0
        self._passes += 1
        self._seen = self._ran = False
        from torch.nn.modules.module import (register_module_forward_hook,
                                             register_module_forward_pre_hook)

        from .hooks import register_private
        if self._name_of is None:
            self._name_of = {id(m): clean_name(n, "") for n, m in self.model.named_modules()}
            self._target_names = {n for n, _m, _k in self.targets}
        if self._look:
            self._handles.append(register_module_forward_pre_hook(self._global_pre))
            self._handles.append(register_module_forward_hook(self._global_post))
        def post(mod: nn.Module, fn: Callable) -> Any:
            return register_private(mod, "_forward_hooks", lambda: mod.register_forward_hook(fn))

        def pre(mod: nn.Module, fn: Callable) -> Any:
            return register_private(mod, "_forward_pre_hooks",
                                    lambda: mod.register_forward_pre_hook(fn))
        for name, mod, kind in self.targets:
            self._handles.append(post(mod, self._hook(
                name, kind, dead_interval(kind, getattr(mod, "alpha", None)))))
        for name, mod in self.recurrent:
            self._handles.append(pre(mod, self._through_time(name, mod)))
        self._handles.append(register_private(
            self.model, "_forward_pre_hooks",
            lambda: self.model.register_forward_pre_hook(self._enter_spy)))
        self._handles.append(register_private(
            self.model, "_forward_hooks", lambda: self.model.register_forward_hook(self._exit_spy)))

    def _hook(self, name: str, kind: str, dead: tuple[float, float] | None) -> Callable:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and name not in self.results and torch.is_grad_enabled():
                self._record(name, kind, out, dead)
        return hook

    def _record(self, key: str, kind: str, out: torch.Tensor,
                dead: tuple[float, float] | None = None) -> None:
        """One activation's statistics: small ones held for the batched read at
        :meth:`collect` (:data:`BATCH_NUMEL`), the others read now (``dead``: the interval of
        :func:`dead_interval`)."""
        o = out.detach()
        n = o.numel()
        size = n * o.element_size()
        if (kind in _BATCHED_KINDS and o.dim() >= 2 and 0 < n <= BATCH_NUMEL
                and o.is_floating_point() and self._held + size <= BATCH_BYTES):
            self._held += size
            parts: list[torch.Tensor] = []
            self._pending.append((key, kind, o, o._version, parts))
            self.results[key] = (kind, parts, _Layout(False, kind in _SAT_KINDS,
                                                      o.shape[unit_dim(o)], n))
            return
        with self._outside_spy():
            got, lay = _activation_parts(kind, o, dead)
        self.results[key] = (kind, got, lay)

    def _read_pending(self) -> None:
        """The held activations' statistics, batched per device and dtype. One written in place
        after its hook ran (its version counter moved) is not read: its values are no longer
        the activation's."""
        pending, self._pending, self._held = self._pending, [], 0
        groups: dict[tuple, list[tuple[torch.Tensor, str, list[torch.Tensor]]]] = {}
        for key, kind, o, version, parts in pending:
            if o._version != version:
                self.results[key] = (kind, [], _Layout(False, False, 0, 0))
                continue
            groups.setdefault((o.device, o.dtype), []).append((o, kind, parts))
        with torch.no_grad():
            for items in groups.values():
                _batched_parts(items)

    @contextlib.contextmanager
    def _outside_spy(self) -> Iterator[None]:
        """The statistics' own torch calls made with our spy mode stepped out of (when it is
        the innermost mode; other modes stay): inside a module hook they would each go through
        its ``__torch_function__`` (issue #15: ~2.7 µs per call, 64 ms of a sampled step on a
        model with 499 activations)."""
        spy = self._spy
        n = _stack_len() if spy is not None and _stack_len is not None else 0
        if n and _stack_at is not None and _stack_at(n - 1) is spy:
            with torch.overrides._pop_mode_temporarily():
                yield
        else:
            yield

    def _global_pre(self, mod: nn.Module, _inp: Any) -> None:
        if torch.compiler.is_compiling():
            return
        name = self._name_of.get(id(mod)) if self._name_of is not None else None
        if name is not None:
            self._stack.append(name)

    def _global_post(self, mod: nn.Module, _inp: Any, out: Any) -> None:
        if torch.compiler.is_compiling():
            return
        name = self._name_of.get(id(mod)) if self._name_of is not None else None
        if name is None:
            return  # another model's module
        if isinstance(out, torch.Tensor):
            self._produced[id(out)] = name
        if self._stack:
            self._stack.pop()

    def _functional(self, kind: str, func: Any, x: torch.Tensor, out: torch.Tensor,
                    dead: tuple[float, float] | None = None) -> None:
        """An activation called as a function: named after the module whose output it was
        applied to (``fc1.relu`` for ``torch.relu(self.fc1(x))``), else after the module whose
        forward called it. Calls made inside an activation module's own forward (``nn.ReLU``
        calls ``F.relu``) are that module's, already measured."""
        where = self._stack[-1] if self._stack else ""
        if where in self._target_names:
            return
        base = self._produced.get(id(x)) or where or "(root)"
        name = getattr(func, "__name__", kind).rstrip("_")
        key = f"{base}.{name}"
        n = 1
        while key in self.results:
            n += 1
            key = f"{base}.{name}{n}"
        self._record(key, kind, out, dead)
        self._seen = True

    def _enter_spy(self, _mod: nn.Module, _inp: Any) -> None:
        if torch.compiler.is_compiling():
            # dynamo is tracing this hook: the model was compiled outside the Guard's sight;
            # from the next arm on, no hooks (this pass's are removed at collect())
            self.compiled = True
            return
        if not self._ran and torch.is_grad_enabled():
            self._ran = True
            if self._look and self._spy is None:
                self._spy = _SoftmaxSpy(self)
                self._spy.__enter__()

    def _exit_spy(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        if self._spy is not None:
            spy, self._spy = self._spy, None
            spy.__exit__(None, None, None)
        if self._ran:
            if out is not None and "(output)" not in self.results:
                st = _logit_stats(out)
                if st is not None:
                    self.results["(output)"] = ("logits", [st], None)

    def _softmax(self, x: torch.Tensor, dim: int) -> None:
        if self._in_spy:
            return
        self._in_spy = True
        try:
            st = _softmax_stats(x, dim)
        finally:
            self._in_spy = False
        if st is None:
            return
        where = (self._stack[-1] if self._stack else "") or "(root)"
        key = f"{where}.softmax"
        n = 1
        while key in self.results:
            n += 1
            key = f"{where}.softmax{n}"
        self.results[key] = ("softmax", [st], None)
        self._seen = True

    def _through_time(self, name: str, mod: nn.Module) -> Callable:
        """Backward signal through time of a recurrent module: the gradient reaching its
        first input step against the one reaching its last, ``||dL/dx_0|| / ||dL/dx_T-1||``.
        A data input that does not require grad is swapped for a detached leaf that does
        (same values, so the parameters' gradients are unchanged); only on sampled steps."""
        def hook(_mod: nn.Module, args: tuple) -> tuple | None:
            if not args or not torch.is_grad_enabled() or name in self.results:
                return None
            x = args[0]
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
                return None  # PackedSequence or unbatched input: not measured
            tdim = 1 if getattr(mod, "batch_first", False) else 0
            steps = x.shape[tdim]
            if steps < 2:
                return None
            new = None
            if not x.requires_grad:
                x = new = x.detach().requires_grad_(True)

            def grad_hook(g: torch.Tensor) -> None:
                with torch.no_grad():
                    gf = g.detach().float()
                    first = gf.select(tdim, 0).norm()
                    last = gf.select(tdim, steps - 1).norm()
                    nan = torch.tensor(math.nan, device=g.device)
                    self.results[name] = ("recurrent", [torch.stack(
                        [first, last, nan, torch.tensor(float(steps), device=g.device)])], None)
            x.register_hook(grad_hook)
            return (new,) + tuple(args[1:]) if new is not None else None
        return hook

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stack = []
        if self._spy is not None:
            self._exit_spy(self.model, None, None)

    def collect(self) -> SampledActivations:
        """Take the statistics gathered since the last arm() and stop listening."""
        self.hookless_armed = False
        if not self._handles and not self.results:
            return _NOTHING_SAMPLED  # a plain step
        self.disarm()
        self._produced = {}
        if self._look and self._ran:
            self._found = self._seen
        self._ran = False
        self._read_pending()
        res, self.results = self.results, {}
        return SampledActivations(res)


_NOTHING_SAMPLED = SampledActivations({})


#: autograd nodes of a cross-entropy over V classes (``F.cross_entropy`` is log-softmax + NLL; a
#: hand-written or soft-target one takes ``log_softmax``)
_CLASS_NODES = frozenset({"NllLossBackward0", "NllLoss2DBackward0", "LogSoftmaxBackward0"})
#: autograd nodes of losses whose starting value is not ln V: regression (MSE, smooth L1,
#: Huber), binary and multi-label cross-entropy (ln 2 per label, whatever V), margin losses
_OTHER_NODES = frozenset({"MseLossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0",
                          "BinaryCrossEntropyBackward0", "BinaryCrossEntropyWithLogitsBackward0",
                          "MultiMarginLossBackward0", "MultilabelMarginLossBackward0",
                          "SoftMarginLossBackward0"})
#: how far below the loss the search looks: the loss function's own nodes sit at the top
#: (label smoothing puts log-softmax 4 nodes down); deeper nodes belong to the model
LOSS_SEARCH_DEPTH, LOSS_SEARCH_NODES = 6, 256


def loss_kind(loss: Any) -> str | None:
    """What the loss's autograd graph says it is: ``"cross_entropy"`` (a log-softmax / NLL node
    near the top and no other loss), ``"other"`` (a regression, binary or margin loss near the
    top: its first value says nothing about ln V), None when the graph does not say (a float,
    a detached loss, a compiled or custom-kernel loss). Reads node names only, once."""
    fn = getattr(loss, "grad_fn", None)
    if fn is None:
        return None
    kinds: set[str] = set()
    level, seen, n = [fn], {fn}, 0
    for depth in range(LOSS_SEARCH_DEPTH):
        nxt: list[Any] = []
        for node in level:
            n += 1
            name = node.name()
            if name in _OTHER_NODES:
                kinds.add("other")
            elif name in _CLASS_NODES:
                kinds.add("cross_entropy")
                continue  # below a log-softmax lies the model
            elif depth == 1 and name == "AbsBackward0" and fn.name() in ("MeanBackward0", "SumBackward0"):
                kinds.add("other")  # F.l1_loss: the mean of |prediction - target|
            for child, _ in node.next_functions:
                if child is not None and child not in seen and n + len(nxt) < LOSS_SEARCH_NODES:
                    seen.add(child)
                    nxt.append(child)
        level = nxt
    if "other" in kinds:
        return "other"
    return "cross_entropy" if kinds else None


#: the autograd nodes of an unscaled, mean-reduced cross-entropy (``F.cross_entropy``,
#: ``nn.CrossEntropyLoss``, ``F.nll_loss`` of a log-softmax), as the loss's own node
PLAIN_CE_NODES = frozenset({"NllLossBackward0", "NllLoss2DBackward0"})


def plain_cross_entropy(loss: Any) -> bool:
    """The loss is a cross-entropy as ``F.cross_entropy`` returns it: its own autograd node is
    the NLL (no weight, sum, division or label smoothing above it). One name read."""
    fn = getattr(loss, "grad_fn", None)
    return fn is not None and fn.name() in PLAIN_CE_NODES


def chance_level(model: nn.Module, first_loss: float, tolerance: float = 0.15,
                 kind: str | None = None) -> float | None:
    """ln V when ``first_loss`` looks like the cross-entropy of an untrained V-way classifier
    or language model: within ``tolerance`` (15%) of ln V for V = the output size of the
    model's last ``nn.Linear`` or the vocabulary of one of its ``nn.Embedding``s (a tied
    head). An untrained net's logits are small, so its cross-entropy starts near ln V
    (measured: digits MLP 2.37 vs ln 10 = 2.30; char GPT 4.17 vs ln 64 = 4.16; word LSTM LM
    6.27 vs ln 523 = 6.26). None when nothing matches (regression losses, unusual heads),
    and when ``kind`` (:func:`loss_kind` of the first loss) is ``"other"``: a regression whose
    first MSE happens to lie near ln V is not a classifier (a chance level there made a noisy
    regression "confidently wrong", a false alarm that halted a healthy run).

    A run that starts from a trained model (resumed with a fresh Guard, fine-tuned on the same
    task) starts well below ln V: when the loss *is* a cross-entropy, unscaled (``kind`` is
    ``"plain_cross_entropy"``: the loss's own autograd node is the NLL, see
    :func:`plain_cross_entropy`) and the first loss is below ln V for V = the last
    ``nn.Linear``'s output size (or the one ``nn.Embedding``'s vocabulary when there is no
    Linear), that ln V is the level: without it the rules that measure progress from the start
    took a converged classifier's noise near zero for progress lost
    (bench/calibrate_detectors.py --resumed). A cross-entropy under a weight, a sum or label
    smoothing says nothing about its level (the zoo's Adam epsilon trap trains 1e-9 x CE)."""
    if kind == "other" or not math.isfinite(first_loss) or first_loss <= 0:
        return None
    sizes: list[int] = []
    last_linear = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last_linear = m.out_features
        elif isinstance(m, nn.Embedding):
            sizes.append(m.num_embeddings)
    if last_linear is not None:
        sizes.insert(0, last_linear)
    best = None
    for v in sizes:
        if v >= 2:
            lv = math.log(v)
            if abs(first_loss - lv) <= tolerance * lv and (best is None or abs(first_loss - lv) < abs(first_loss - best)):
                best = lv
    if best is None and kind == "plain_cross_entropy":
        head = last_linear if last_linear is not None else (
            sizes[0] if len(sizes) == 1 else None)
        if head is not None and head >= 2 and first_loss < math.log(head):
            best = math.log(head)  # a trained start, below the uninformed guess
    return best


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    name = type(optimizer).__name__.lower()
    for k in ("adamw", "adam", "rmsprop", "adagrad", "sgd", "lion"):
        if k in name:
            return k
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


#: the module name of the parameters the optimizer holds and the model does not own
OUTSIDE_MODEL = "(outside the model)"


class Probe:
    """Measures one step. Construction fixes the parameter order and module grouping."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 sharded: bool = False, process_group: Any = None) -> None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        names: list[str] = []
        self.params: list[torch.Tensor] = []
        seen: set[int] = set()
        for name, p in model.named_parameters():
            # frozen ones too (left in the optimizer: named by their module, not taken for
            # parameters the model does not own; unfrozen later, their gradient is theirs)
            if id(p) in in_opt and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
                names.append(name)
        if not any(p.requires_grad for p in self.params):
            raise ValueError("the optimizer holds no trainable parameter of the model: "
                             "expected Guard(model, optimizer) with the optimizer built on "
                             "model.parameters()")
        owned = len(names)
        for g in optimizer.param_groups:  # optimizer params that the model does not own
            for p in g["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
                    names.append(f"param{len(names)}")
        if not self.params:
            raise ValueError("the optimizer holds no trainable parameter of the model: "
                             "expected Guard(model, optimizer) with optimizer built on "
                             "model.parameters()")
        self.param_names = names
        self.modules: list[str] = []
        index: dict[str, int] = {}
        group = []
        for k, n in enumerate(names):
            # a parameter only the optimizer holds (a learnable temperature kept beside the
            # model) is not the model's root module's: findings name it apart
            mod = (clean_name(n.rsplit(".", 1)[0] if "." in n else "") if k < owned
                   else OUTSIDE_MODEL)
            if mod not in index:
                index[mod] = len(self.modules)
                self.modules.append(mod)
            group.append(index[mod])
        self.group = np.asarray(group, dtype=np.int64)
        self.sharded = sharded
        self._world_size: int | None = None
        bad = [n for n, p in zip(names, self.params) if p.is_complex() or not p.is_floating_point()]
        if bad:
            raise TypeError(f"trainguard guards real floating-point parameters; {bad[:3]} "
                            f"{'are' if len(bad) > 1 else 'is'} "
                            f"{self.params[names.index(bad[0])].dtype} (complex parameters: "
                            "train their real and imaginary parts as two real parameters)")
        # norms accumulate in fp32, or in fp64 when some parameter is float64 (a norm cannot
        # be taken in a narrower type than its input); tensors already of that type take the
        # fused norm's fastest path
        self.norm_dtype = (torch.float64 if any(p.dtype == torch.float64 for p in self.params)
                           else torch.float32)
        self._fp32 = all(p.dtype == self.norm_dtype for p in self.params)
        self._all_idx = np.arange(len(self.params), dtype=np.int64)
        self._one_per_module = bool(np.array_equal(self.group, self._all_idx))
        #: module -> the positions of its parameters (the host-side grouping of a full step)
        self._members: list[list[int]] = [[] for _ in self.modules]
        for i, m in enumerate(group):
            self._members[m].append(i)
        self.process_group = process_group
        self.device = self.params[0].device
        self._world()
        self._one_device = all(p.device == self.device for p in self.params)
        self.last_grads: list[torch.Tensor] = []
        #: the last set of parameters with gradients when some had none (see :meth:`_subset`)
        self._sub_list: list[int] | None = None
        self._sub_idx = self._all_idx
        self._sub_members: list[list[int]] = self._members
        self._sub_gradless: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        self._subsets: dict[tuple[int, ...], tuple[np.ndarray, list[list[int]],
                                                    tuple[tuple[str, ...], tuple[str, ...]]]] = {}

    # -- measurement ----------------------------------------------------------------
    def grads(self) -> tuple[list[torch.Tensor], np.ndarray]:
        """Existing gradients and the indices of their parameters."""
        gs = [p.grad for p in self.params]
        if all(g is not None for g in gs):
            full = cast("list[torch.Tensor]", gs)
            return ([_local(g) for g in full] if self.sharded else full), self._all_idx
        idx = [i for i, g in enumerate(gs) if g is not None]
        if idx != self._sub_list:
            self._subset(idx)
        return [_local(cast(torch.Tensor, gs[i])) for i in idx], self._sub_idx

    #: how many sets of parameters with gradients :meth:`_subset` remembers (a mixture of
    #: experts routes each step to another few: the sets recur)
    SUBSETS = 16

    def _subset(self, idx: list[int]) -> None:
        """The parameters that have gradients when some do not (frozen ones left in the
        optimizer, a branch unused this step): their index, one array per set of parameters
        (the short path's record takes it by identity), each module's positions in it and the
        modules without any; the last :attr:`SUBSETS` sets are remembered."""
        key = tuple(idx)
        hit = self._subsets.get(key)
        if hit is None:
            members: list[list[int]] = [[] for _ in self.modules]
            for j, i in enumerate(idx):
                members[int(self.group[i])].append(j)
            hit = (np.asarray(idx, dtype=np.int64), members,
                   self._gradless([k for k, mine in enumerate(members) if not mine]))
            if len(self._subsets) >= self.SUBSETS:
                del self._subsets[next(iter(self._subsets))]  # the oldest
            self._subsets[key] = hit
        self._sub_list = idx
        self._sub_idx, self._sub_members, self._sub_gradless = hit

    def gradless(self, idx: np.ndarray) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The modules none of whose parameters is in ``idx`` (no gradient at this step):
        (those with a parameter that requires a gradient, those entirely frozen)."""
        if idx is self._all_idx:
            return (), ()
        if idx is self._sub_idx:
            return self._sub_gradless
        present = {int(k) for k in self.group[idx]}
        return self._gradless([k for k in range(len(self.modules)) if k not in present])

    def _gradless(self, absent: list[int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        wants = [any(self.params[i].requires_grad for i in self._members[k]) for k in absent]
        return (tuple(self.modules[k] for k, w in zip(absent, wants) if w),
                tuple(self.modules[k] for k, w in zip(absent, wants) if not w))

    def measure_device(self, loss: torch.Tensor | float, *, with_params: bool,
                       extra: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, np.ndarray, int]:
        """Everything for one step stacked in one device vector (all-reduced when
        distributed): [grad norms..., param norms..., extra..., loss]. Returns
        (vector, index of the parameters that have gradients, number of norms)."""
        # no autograd recording (a create_graph backward leaves gradients that require grad);
        # the raw switch: the no_grad context manager costs a few times more on every step
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            gs, idx = self.grads()
            self.last_grads = gs
            kw = {} if self._fp32 else {"dtype": self.norm_dtype}
            n_norms = len(gs) + (len(self.params) if with_params else 0)
            if isinstance(loss, torch.Tensor):
                lt = loss.detach()
                if lt.dtype is not self.norm_dtype or lt.dim():
                    lt = lt.reshape(()).to(self.norm_dtype)
            else:
                lt = torch.tensor(float(loss), device=self.device, dtype=self.norm_dtype)
            norms = list(torch._foreach_norm(gs, 2, **kw)) if gs else []
            if with_params:
                # the parameters themselves: with autograd off no detached views are needed
                # (a view per tensor cost ~1 ms per cadence step on 1,000 tensors)
                ps = [_local(p) for p in self.params] if self.sharded else self.params
                norms.extend(torch._foreach_norm(ps, 2, **kw))
            if not extra and self._one_device:
                vec = torch.stack(norms + [lt])  # the common step: one stack, nothing else
            else:
                parts = [torch.stack(norms).to(self.device, self.norm_dtype)] if norms else []
                parts.extend(e.reshape(-1).to(self.device, self.norm_dtype) for e in extra)
                parts.append(lt.reshape(1).to(self.device))
                vec = torch.cat(parts)
            if self._world_size != 1:
                vec = self._reduce(vec, n_norms=n_norms)
        finally:
            torch._C._set_grad_enabled(grad_mode)
        return vec, idx, n_norms

    def exact_grad_norms(self, gn: np.ndarray) -> np.ndarray:
        """The gradient norms of the last measurement again, accumulated in fp64: finite
        wherever the gradient's values are finite (an fp32 norm overflows for values ~1e20).
        Single-process only (a distributed measurement keeps its all-reduced values)."""
        if self._world() != 1 or not self.last_grads:
            return gn
        with torch.no_grad():
            v = torch.stack(torch._foreach_norm(self.last_grads, 2, dtype=torch.float64))
        return v.cpu().numpy()

    def exact_param_norms(self) -> np.ndarray:
        """Every parameter's norm accumulated in fp64 (rare path: an fp32 norm overflowed)."""
        with torch.no_grad():
            v = torch.stack(torch._foreach_norm([_local(p) for p in self.params], 2,
                                                dtype=torch.float64))
        v = self._reduce(v, n_norms=len(self.params)) if self._world() != 1 else v
        return v.cpu().numpy()

    def split(self, host: np.ndarray, idx: np.ndarray, with_params: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        ng = len(idx)
        gn = host[:ng]
        pn = host[ng:ng + len(self.params)] if with_params else None
        off = ng + (len(self.params) if with_params else 0)
        return gn, idx, pn, host[off:-1], host[-1:]

    def measure(self, loss: torch.Tensor | float, *, with_params: bool,
                extra: Sequence[torch.Tensor] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """Returns (grad_norms per param, grads index, param_norms or None, extra values,
        [loss]) after one host transfer (and one all-reduce when distributed)."""
        vec, idx, _ = self.measure_device(loss, with_params=with_params, extra=extra)
        host = vec.cpu().numpy().astype(np.float64)
        return self.split(host, idx, with_params)

    def _world(self) -> int:
        """World size when distributed (checked once: the Guard is built after
        init_process_group), else 1."""
        if self._world_size is None:
            import torch.distributed as dist
            self._world_size = (dist.get_world_size(self.process_group)
                                if dist.is_available() and dist.is_initialized() else 1)
        return self._world_size

    def _reduce(self, vec: torch.Tensor, n_norms: int) -> torch.Tensor:
        world = self._world()
        if world == 1:
            return vec
        import torch.distributed as dist
        # Squared norms add over disjoint shards (FSDP); DDP gradients are identical on all
        # ranks, so averaging keeps them. Non-finite values propagate through the sum, so a
        # NaN on one rank is seen by every rank: all ranks take the same decision.
        v = vec.clone()
        if self.sharded:
            v[:n_norms] = v[:n_norms].square()
        dist.all_reduce(v, group=self.process_group)
        if self.sharded:
            v[:n_norms] = v[:n_norms].sqrt()
        else:
            v[:n_norms] = v[:n_norms] / world
        v[n_norms:] = v[n_norms:] / world
        return v

    def group_norms(self, per_param: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Per-module L2 norms from per-parameter norms (NaN/Inf propagate)."""
        if not len(idx):
            return np.zeros(len(self.modules))
        with np.errstate(over="ignore", invalid="ignore"):
            sq = np.bincount(self.group[idx], weights=np.square(per_param),
                             minlength=len(self.modules))
            return np.sqrt(sq)


def grad_total(gn: "Sequence[float] | np.ndarray") -> float:
    """The global norm from per-parameter norms (of the gradients, or of the weights on the
    parameter cadence): the square root of their squares' sum (inf when one is inf, NaN when one is NaN). Up to :data:`QUICK_GROUPING` norms added in
    order in plain Python, more with numpy's sum; both paths of a step call this one function."""
    if len(gn) > QUICK_GROUPING:
        with np.errstate(over="ignore", invalid="ignore"):
            return math.sqrt(float(np.square(np.asarray(gn, dtype=np.float64)).sum()))
    if isinstance(gn, np.ndarray):
        gn = gn.tolist()
    return math.sqrt(sum([x * x for x in gn]))


def build_stats(step: int, probe: Probe, gn: np.ndarray, idx: np.ndarray,
                pn: np.ndarray | None, loss: float, **kw: Any) -> StepStats:
    with np.errstate(over="ignore", invalid="ignore"):
        total = grad_total(gn) if len(gn) else 0.0
        if len(probe.modules) == len(idx) and idx is probe._all_idx and probe._one_per_module:
            groups = np.sqrt(np.square(gn))  # one parameter tensor per module: no grouping
        else:
            groups = probe.group_norms(gn, idx)
        pgroups = probe.group_norms(pn, probe._all_idx) if pn is not None else None
        ptotal = grad_total(pn) if pn is not None else None
    missing, frozen = probe.gradless(idx)
    return StepStats(step=step, loss=float(loss), grad_norm=total, modules=probe.modules,
                     grad_norms=groups.tolist(),
                     param_norms=pgroups.tolist() if pgroups is not None else None,
                     param_norm=ptotal, missing_grad_modules=missing, frozen_modules=frozen, **kw)


#: above this many parameter tensors the short path groups per-module norms, and
#: :func:`grad_total` sums, with numpy (the grouping: same sums, same order). Measured warm on
#: this CPU (``python bench/step_record.py``, and ``--quick-grouping 100000`` for all-Python):
#: the plain-Python record takes 7 µs for 6 tensors against the general path's 20, but
#: 296 µs for 998 tensors against 106; with the threshold, 91 µs
QUICK_GROUPING = 64


def quick_stats(step: int, probe: Probe, gn: list[float], idx: np.ndarray, loss: float,
                pn: list[float] | None = None, **kw: Any) -> StepStats | None:
    """:func:`build_stats` for the common step, in plain Python on the host list (on a small
    model numpy's per-call cost is most of the Guard's time; the arithmetic is the same:
    squares summed in order per module, as ``np.bincount`` does). ``pn``: every parameter's
    norm, on the ``param_norm_every`` cadence. ``idx``: the probe's index of the parameters
    that have gradients (all of them, or the set :meth:`Probe.grads` last saw when some have
    none: frozen parameters left in the optimizer). None when a norm or a known loss is not
    finite or ``idx`` is another index: the general path takes those (an unknown loss,
    ``loss_known=False``, is NaN by convention and stays on this path)."""
    members: list[list[int]] | None = None
    gradless: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    if idx is probe._all_idx:
        pass
    elif idx is probe._sub_idx:
        # some parameters have no gradient: a module with none of its own has 0.0
        members, gradless = probe._sub_members, probe._sub_gradless
    else:
        return None
    a = np.asarray(gn, dtype=np.float64) if len(gn) > QUICK_GROUPING else None
    total = grad_total(gn if a is None else a)
    loss_ok = math.isfinite(loss) or not kw.get("loss_known", True)
    if not (math.isfinite(total) and loss_ok):
        return None
    pgroups = ptotal = None
    if pn is not None:
        pa = np.asarray(pn, dtype=np.float64) if a is not None else None
        ptotal = grad_total(pn if pa is None else pa)
        if not math.isfinite(ptotal):
            return None
        pgroups = _groups(probe, pn, pa)
    groups = _groups(probe, gn, a, idx, members)
    return StepStats(step=step, loss=loss, grad_norm=total, modules=probe.modules,
                     grad_norms=groups, param_norms=pgroups, param_norm=ptotal,
                     missing_grad_modules=gradless[0], frozen_modules=gradless[1], **kw)


def _groups(probe: Probe, norms: list[float], a: np.ndarray | None,
            idx: np.ndarray | None = None, members: list[list[int]] | None = None) -> list[float]:
    """Per-module norms from the parameters' norms, as :func:`build_stats` computes them
    (``a``: the same norms as an array when there are more than :data:`QUICK_GROUPING`;
    ``idx`` and ``members``: when only some parameters have norms, their index and each
    module's positions among them; every parameter otherwise)."""
    if a is not None:  # many tensors: numpy's loop
        return probe.group_norms(a, probe._all_idx if idx is None else idx).tolist()
    if members is None:
        if probe._one_per_module:
            return [math.sqrt(x * x) for x in norms]  # one parameter tensor per module
        members = probe._members
    return [math.sqrt(sum([norms[i] * norms[i] for i in m])) for m in members]
