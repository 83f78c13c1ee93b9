"""Replay one training step under heavy instrumentation and name where the first NaN/Inf
came from.

This is the expensive tier of the two-tier design in research/prior-art-tools.md §9.1: it
runs only after the cheap always-on sentinel (the Guard's fused norms) has seen a non-finite
value, so it may synchronise with the device as often as it likes.

Forward rule (producer vs propagator, after HF ``DebugUnderflowOverflow`` and the NaNGuard
proposal pytorch#182156): every module call is checked twice, its inputs at the forward
pre-hook and its outputs at the forward hook. The first check that sees a NaN/Inf decides:

* outputs non-finite while its inputs were finite: that module produced it;
* inputs non-finite at a pre-hook: the value was made by the functional code of the
  innermost module still running (the enclosing module), between two of its submodules;
* the model's own inputs: origin ``input``.

Backward rule: the replayed forward aliases each module call's tensor inputs
(``x.view_as(x)``, one alias per call, so a module's input gradient is *its own*
contribution even when several modules read the same tensor) and puts tensor hooks on the
aliases, on every module output and on every parameter. Hooks fire in the autograd engine's
order. The first module call whose input gradient (or parameter gradient) is non-finite
while every gradient flowing into its outputs was finite produced it. A non-finite gradient
flowing into the model's outputs is the loss function's doing (origin ``loss``).

Tensor hooks are used rather than ``register_full_backward_hook``, which breaks modules whose
outputs are modified in place (pytorch#61519); in-place activations are additionally switched
to out-of-place for the replay (numerically identical).

The replay runs from the current parameters with the captured inputs, RNG state, autocast
and grad mode, and computes gradients with ``torch.autograd.grad`` so ``p.grad`` is never
touched; buffers (BatchNorm running statistics), RNG state and in-place flags are restored.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..types import Finding

from ..names import clean_name  # noqa: F401  (re-exported: locate's public helper)
_MAX_LEAVES = 256


# ---------------------------------------------------------------------------- naming
def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def module_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, m in model.named_modules():
        names.setdefault(id(m), clean_name(n))
    return names


def param_owner(name: str) -> str:
    return clean_name(name.rsplit(".", 1)[0]) if "." in name else "(root)"


# ---------------------------------------------------------------------------- pytrees
def tensor_leaves(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in nested tuples/lists/dicts (HF ModelOutput is a
    Mapping), in a deterministic order."""
    out: list[tuple[str, torch.Tensor]] = []
    _leaves(obj, path, out, depth)
    return out


def _leaves(obj: Any, path: str, out: list, depth: int) -> None:
    if len(out) >= _MAX_LEAVES or depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _leaves(v, f"{path}.{k}" if path else str(k), out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _leaves(v, f"{path}[{i}]", out, depth + 1)


def _map_plain(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], depth: int = 0) -> Any:
    """Apply fn to tensors inside plain tuples/lists/dicts (subclasses such as namedtuples
    and PackedSequence are left as they are)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if depth > 4:
        return obj
    if type(obj) is tuple:
        return tuple(_map_plain(v, fn, depth + 1) for v in obj)
    if type(obj) is list:
        return [_map_plain(v, fn, depth + 1) for v in obj]
    if type(obj) is dict:
        return {k: _map_plain(v, fn, depth + 1) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------- tensor stats
@dataclass
class TStat:
    """What the replay reads of one tensor (one device->host transfer)."""

    dtype: str
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    absmax: float = 0.0  # over the finite values
    numel: int = 0

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.posinf == 0 and self.neginf == 0

    @property
    def mask_like(self) -> bool:
        """Only 0 and -inf: an additive attention mask, not a fault."""
        return self.nan == 0 and self.posinf == 0 and self.absmax == 0.0

    @property
    def headroom(self) -> float:
        """How many times larger the dtype's largest finite value is than |x|max."""
        try:
            mx = torch.finfo(getattr(torch, self.dtype.replace("torch.", ""))).max
        except (TypeError, AttributeError):
            return math.inf
        return mx / self.absmax if self.absmax > 0 else math.inf

    def describe(self) -> str:
        dt = self.dtype.replace("torch.", "")
        if self.finite:
            return f"{dt}, |x|max {self.absmax:.3g}, headroom {self.headroom:.3g}x"
        bad = []
        if self.nan:
            bad.append(f"{self.nan} NaN")
        if self.posinf:
            bad.append(f"{self.posinf} +Inf")
        if self.neginf:
            bad.append(f"{self.neginf} -Inf")
        return f"{dt}, {', '.join(bad)} of {self.numel}, finite |x|max {self.absmax:.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype.replace("torch.", ""), "nan": self.nan, "posinf": self.posinf,
                "neginf": self.neginf, "absmax": self.absmax, "numel": self.numel,
                "headroom": self.headroom}


def tstat(t: torch.Tensor) -> TStat | None:
    """Stats of a floating tensor; None for integer/bool/complex tensors."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    d = t.detach()
    if hasattr(d, "_local_tensor"):
        d = d._local_tensor
    n = d.numel()
    if n == 0:
        return TStat(str(d.dtype))
    with torch.no_grad():
        fin = torch.isfinite(d)
        a = d.abs()
        am = torch.where(fin, a, torch.zeros((), dtype=a.dtype, device=a.device)).amax()
        v = torch.stack([torch.isnan(d).sum().double(), (d == math.inf).sum().double(),
                         (d == -math.inf).sum().double(), am.double()]).tolist()
    return TStat(str(d.dtype), int(v[0]), int(v[1]), int(v[2]), float(v[3]), n)


def nonfinite_leaves(obj: Any, path: str, *, allow_masks: bool) -> list[tuple[str, TStat]]:
    bad = []
    for p, t in tensor_leaves(obj, path):
        s = tstat(t)
        if s is None or s.finite:
            continue
        if allow_masks and s.mask_like and not t.requires_grad:
            continue  # an additive -inf attention mask, not a fault
        bad.append((p, s))
    return bad


# ---------------------------------------------------------------------------- state
def nonfinite_params(model: nn.Module) -> list[tuple[str, TStat]]:
    """Parameters holding NaN/Inf, in registration order (one fused pass, one transfer)."""
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return []
    ts = [p.detach()._local_tensor if hasattr(p, "_local_tensor") else p.detach() for _, p in named]
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(t).all() if t.numel() else torch.ones((), dtype=torch.bool,
                             device=t.device) for t in ts]).cpu().tolist()
    out = []
    for (n, _), t, ok in zip(named, ts, flags):
        if not ok:
            out.append((n, tstat(t)))
    return out


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, cuda: bool) -> Iterator[None]:
    """Restore buffers (BatchNorm running stats), RNG states and in-place flags on exit."""
    bufs = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else None
    flipped = []
    for m in model.modules():
        # out-of-place for the replay: same numbers, and tensor hooks see every version
        if type(m).__module__.startswith("torch.nn") and getattr(m, "inplace", None) is True:
            m.inplace = False
            flipped.append(m)
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True
        with torch.no_grad():
            for b, saved in bufs:
                if b.shape == saved.shape:
                    b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def autocast_state() -> dict[str, Any]:
    """The ambient autocast settings (cheap: two or four C calls)."""
    st = {"cpu": [torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu"))]}
    if torch.cuda.is_available():
        st["cuda"] = [torch.is_autocast_enabled("cuda"), str(torch.get_autocast_dtype("cuda"))]
    return st


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def autocast_contexts(state: Mapping[str, Any] | None, device_type: str | None = None
                      ) -> contextlib.ExitStack:
    """Re-enter recorded autocast settings. ``device_type`` maps settings recorded on another
    device (fp16 autocast on CUDA replayed on a CPU) onto the replay device."""
    stack = contextlib.ExitStack()
    if not state:
        return stack
    items = dict(state)
    if device_type is not None and device_type not in items:
        on = [v for v in items.values() if v[0]]
        items = {device_type: on[0] if on else [False, "torch.bfloat16"]}
    for dev, (enabled, dt) in items.items():
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        if enabled:
            stack.enter_context(torch.autocast(dev, dtype=_dtype(dt)))
        elif (torch.is_autocast_enabled(dev)):
            stack.enter_context(torch.autocast(dev, enabled=False))
    return stack


# ---------------------------------------------------------------------------- result
#: Where-values that are not module paths.
LOSS_WHERE = "(loss)"

_ORIGIN_REMEDIES = {
    "input": ("the batch itself holds NaN/Inf: check the data pipeline (normalisation by a zero "
              "std, log of 0, corrupted samples) and filter bad samples",),
    "forward": ("the named module's output overflowed or hit an undefined op: in fp16 keep it "
                "in fp32 (an autocast-disabled region) or switch to bf16; add normalisation or "
                "clamp its input; lower the learning rate if its weights grew",),
    "loss": ("the loss function produced it: use log_softmax/cross_entropy instead of "
             "log(softmax), add an epsilon inside log/sqrt/division, check the targets",),
    "backward": ("the named module's backward produced it from finite incoming gradients: "
                 "sqrt/pow/norm at 0, division by a tiny value, or fp16 overflow in its "
                 "gradient; add an epsilon or keep it in fp32",),
    "optimizer": ("the update made finite weights non-finite: lower the learning rate, raise "
                  "Adam's eps, clip gradients, or keep fp32 master weights",),
    "parameters": ("the weights were already non-finite before this step: a corrupted "
                   "checkpoint or an update the Guard did not see; reload a clean checkpoint",),
}


@dataclass
class Location:
    """Where the first non-finite value of a step came from.

    ``origin`` is one of :data:`trainguard.types.ORIGINS` (or None when the replay found
    nothing non-finite); ``where`` the module path as the model names it, ``"args[0]"``-style
    for the model's inputs, ``"(loss)"`` for the loss function; ``message`` shows the last
    healthy values before the first bad one; ``finding`` is the same as a
    :class:`~trainguard.Finding` of kind ``"nonfinite"``.
    """

    origin: str | None
    where: str
    message: str
    locations: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)
    finding: Finding | None = None
    #: what to change, when it differs from the origin's usual remedies (a fed-back state)
    remedies: tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return self.origin is not None

    def __str__(self) -> str:
        if not self.found:
            return f"nothing non-finite: {self.message}"
        return f"{self.origin} at {self.where}: {self.message}"

    def as_finding(self, step: int = 0, base: Finding | None = None) -> Finding:
        ev = dict(base.evidence) if base is not None else {}
        ev["locate"] = dict(self.evidence)
        msg = self.message
        if base is not None and base.message and self.found:
            msg = f"{self.message} (detector: {base.message})"
        elif base is not None and not self.found:
            msg = f"{base.message}; replay: {self.message}"
        rem = self.remedies or _ORIGIN_REMEDIES.get(self.origin or "", ())
        rem = rem + tuple(r for r in (base.remedies if base is not None else ()) if r not in rem)
        where = self.where if self.found else (base.where if base is not None else "")
        locs = self.locations if self.found else (base.locations if base is not None else ())
        return Finding(kind="nonfinite", step=base.step if base is not None else step,
                       message=msg, where=where, locations=tuple(locs),
                       evidence=ev, severity=base.severity if base is not None else "critical",
                       origin=self.origin if self.found else (base.origin if base else None),
                       remedies=rem)


def _frames(frames: Sequence[tuple[str, TStat]], what: str) -> str:
    if not frames:
        return ""
    parts = [f"{n} ({s.describe()})" for n, s in frames]
    return f"; last healthy {what} before it: " + " -> ".join(parts)


# ---------------------------------------------------------------------------- the replay
class _Call:
    __slots__ = ("name", "index", "out_bad", "out_stat", "parent")

    def __init__(self, name: str, index: int, parent: "_Call | None") -> None:
        self.name, self.index, self.parent = name, index, parent
        self.out_bad = False
        self.out_stat: TStat | None = None


class _Recorder:
    def __init__(self, root: nn.Module, *, backward: bool, frames: int = 3) -> None:
        self.root = root
        self.names = module_names(root)
        self.backward = backward
        self.stack: list[_Call] = []
        self.calls: list[_Call] = []
        self.calls_of: dict[str, list[_Call]] = {}
        self.fwd_bad: tuple[str, str, TStat, str] | None = None  # (origin, where, stat, detail)
        self.fwd_frames: deque[tuple[str, TStat]] = deque(maxlen=frames)
        self.bwd_bad: tuple[str, str, TStat, str] | None = None
        self.bwd_first: tuple[str, TStat] | None = None
        self.bwd_frames: deque[tuple[str, TStat]] = deque(maxlen=frames)
        self.root_call: _Call | None = None
        self.pending: tuple[str, str, TStat, str] | None = None
        self.handles: list[Any] = []

    # -- installation
    def install(self) -> None:
        for m in self.root.modules():
            name = self.names[id(m)]
            self.handles.append(m.register_forward_pre_hook(self._pre(name, m is self.root),
                                                            with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post(name)))
        if self.backward:
            for n, p in self.root.named_parameters():
                if p.requires_grad:
                    self.handles.append(p.register_hook(self._param_hook(n)))

    def remove(self) -> None:
        for h in self.handles:
            try:
                h.remove()
            except Exception:  # pragma: no cover
                pass
        self.handles = []

    # -- forward
    def _pre(self, name: str, is_root: bool) -> Callable:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
            call = _Call(name, len(self.calls_of.get(name, ())), self.stack[-1] if self.stack else None)
            enclosing = self.stack[-1].name if self.stack else None
            self.stack.append(call)
            self.calls.append(call)
            self.calls_of.setdefault(name, []).append(call)
            if is_root and self.root_call is None:
                self.root_call = call
            if self.fwd_bad is None:
                bad = nonfinite_leaves((args, kwargs), "", allow_masks=True)
                if bad:
                    path, st = bad[0]
                    if enclosing is None:
                        self.fwd_bad = ("input", _arg_path(path), st, "")
                    else:
                        self.fwd_bad = ("forward", enclosing, st,
                                        f"made by {enclosing}'s own code (between its submodules): "
                                        f"the input of {name} was already non-finite")
            if not self.backward:
                return None
            memo: dict[int, torch.Tensor] = {}

            def alias(t: torch.Tensor) -> torch.Tensor:
                if not (t.requires_grad and t.is_floating_point()):
                    return t
                a = memo.get(id(t))
                if a is None:
                    a = t.view_as(t)
                    a.register_hook(self._grad_hook("in", call))
                    memo[id(t)] = a
                return a
            return _map_plain(args, alias), _map_plain(kwargs, alias)
        return hook

    def _post(self, name: str) -> Callable:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            call = None
            while self.stack:
                c = self.stack.pop()
                if c.name == name:
                    call = c
                    break
            leaves = tensor_leaves(out)
            if self.fwd_bad is None:
                worst: TStat | None = None
                for _, t in leaves:
                    s = tstat(t)
                    if s is None:
                        continue
                    if not s.finite:
                        self.fwd_bad = ("forward", name, s, "")
                        break
                    if worst is None or s.absmax > worst.absmax:
                        worst = s
                if self.fwd_bad is None and worst is not None:
                    self.fwd_frames.append((name, worst))
            if self.backward and call is not None:
                for _, t in leaves:
                    if t.requires_grad and t.is_floating_point():
                        t.register_hook(self._grad_hook("out", call))
        return hook

    # -- backward
    def _grad_hook(self, kind: str, call: _Call) -> Callable:
        def hook(g: torch.Tensor) -> None:
            self._event(kind, call, g)
        return hook

    def _param_hook(self, pname: str) -> Callable:
        owner = param_owner(pname)

        def hook(g: torch.Tensor) -> None:
            s = tstat(g)
            if s is None:
                return
            if s.finite:
                self.bwd_frames.append((f"{clean_name(pname)}.grad", s))
                return
            if self.bwd_first is None:
                self.bwd_first = (owner, s)
            if self.bwd_bad is not None:
                return
            calls = self.calls_of.get(owner, [])
            if not calls:
                # a parameter used functionally by an enclosing module (MultiheadAttention's
                # out_proj): blame its module unless the NaN also reaches the enclosing
                # module's input gradient (then the enclosing module's code made it)
                if self.pending is None:
                    self.pending = ("backward", owner, s,
                                    f"the gradient of its parameter {clean_name(pname)} is "
                                    "non-finite while the gradient flowing into it was finite")
                return
            if any(not c.out_bad for c in calls):
                self.bwd_bad = ("backward", owner, s,
                                f"the gradient of its parameter {clean_name(pname)} is "
                                "non-finite while the gradient flowing into it was finite")
                return
            self._blame_enclosing(calls[0].parent, owner, s)
        return hook

    def _blame_enclosing(self, start: _Call | None, child: str, s: TStat) -> None:
        """The innermost enclosing call whose incoming gradient was finite made it (code
        between its submodules)."""
        c = start
        while c is not None and c.out_bad:
            c = c.parent
        if c is None:
            return
        self.bwd_bad = ("backward", c.name, s,
                        f"made by {c.name}'s own code (between its submodules): the gradient "
                        f"reaching {child} was already non-finite while the gradient flowing "
                        f"into {c.name} was finite")

    def _event(self, kind: str, call: _Call, g: torch.Tensor) -> None:
        s = tstat(g)
        if s is None:
            return
        if kind == "out":
            if s.finite:
                call.out_stat = s
                self.bwd_frames.append((f"{call.name} (grad of output)", s))
                return
            call.out_bad = True
            if self.bwd_first is None:
                self.bwd_first = (call.name, s)
            if self.bwd_bad is None:
                if call is self.root_call:
                    self.bwd_bad = ("loss", LOSS_WHERE, s,
                                    "the gradient flowing into the model's output is non-finite")
                else:
                    self._blame_enclosing(call.parent, call.name, s)
            return
        # kind == "in": this call's own input gradient
        if s.finite:
            self.bwd_frames.append((f"{call.name} (grad of input)", s))
            return
        if self.bwd_first is None:
            self.bwd_first = (call.name, s)
        if self.bwd_bad is None:
            if not call.out_bad:
                self.bwd_bad = ("backward", call.name, s,
                                "its input gradient is non-finite while the gradient flowing "
                                "into its output was finite")
            else:
                self._blame_enclosing(call.parent, call.name, s)


def _arg_path(path: str) -> str:
    # paths from tensor_leaves((args, kwargs)): "[0][i]..." for args, "[1].key" for kwargs
    if path.startswith("[0]"):
        return "args" + path[3:]
    if path.startswith("[1]."):
        return "kwargs." + path[4:]
    return path


_REPLAYING = [0]


def replaying() -> bool:
    """True while :func:`replay_step` runs the model again: forward hooks that collect the
    training loop's losses (the Hugging Face adapter's) must not count the replay's."""
    return _REPLAYING[0] > 0


def _marks_replay(fn: Callable[..., Location]) -> Callable[..., Location]:
    """While ``fn`` runs, :func:`replaying` is True."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Location:
        _REPLAYING[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _REPLAYING[0] -= 1
    return run


@_marks_replay
def replay_step(model: nn.Module, args: tuple, kwargs: dict, *,
                grad_outputs: Sequence[torch.Tensor | None] | None = None,
                loss_fn: Callable[[Any], torch.Tensor] | None = None,
                loss_value: float | None = None,
                rng: torch.Tensor | None = None, cuda_rng: Sequence[torch.Tensor] | None = None,
                autocast: Mapping[str, Any] | None = None, device_type: str | None = None,
                grad_enabled: bool = True, backward: bool = True) -> Location:
    """Re-run one step of ``model`` (already unwrapped) and locate the first non-finite value.

    Backward is driven either by ``grad_outputs`` (the gradients that flowed into the
    model's output tensors, in :func:`tensor_leaves` order) or by ``loss_fn(output)``.
    ``loss_value`` is the loss the training loop saw (a non-finite loss with a finite
    forward and finite gradients is the loss function's doing).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = any(p.is_cuda for p in model.parameters())
    rec = _Recorder(model, backward=backward and grad_enabled and bool(params))
    ev: dict[str, Any] = {}
    with preserved_state(model, cuda=cuda):
        if rng is not None:
            torch.set_rng_state(rng)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(cuda_rng))
        rec.install()
        try:
            with torch.set_grad_enabled(grad_enabled), autocast_contexts(autocast, device_type):
                out = model(*args, **kwargs)
                if rec.fwd_bad is not None:
                    return _forward_location(rec, ev)
                leaves = [t for _, t in tensor_leaves(out)]
                loss = None
                if loss_fn is not None:
                    loss = loss_fn(out)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise TypeError("loss_fn must return a scalar tensor, got "
                                        f"{type(loss).__name__}")
                    ls = tstat(loss.detach().float())
                    if ls is not None and not ls.finite:
                        ev["loss"] = ls.to_dict()
                        return _clean_location(rec, ev, float(loss.detach().float()),
                                               backward=False)
            if not rec.backward:
                return _clean_location(rec, ev, loss_value, backward=False)
            if loss is not None:
                roots, grads = [loss], [None]
            else:
                if grad_outputs is None:
                    return _clean_location(rec, ev, loss_value, backward=False)
                pairs = [(t, g) for t, g in zip(leaves, grad_outputs)
                         if g is not None and t.requires_grad]
                bad_g = [(i, tstat(g)) for i, (t, g) in enumerate(pairs)]
                bad_g = [(i, s) for i, s in bad_g if s is not None and not s.finite]
                if bad_g:
                    return _loss_location(rec, bad_g[0][1], ev)
                if not pairs:
                    return _clean_location(rec, ev, loss_value, backward=False)
                roots = [t for t, _ in pairs]
                grads = [g.to(t.dtype) if g.dtype != t.dtype else g for t, g in pairs]
            torch.autograd.grad(roots, params, grad_outputs=grads, allow_unused=True)
        finally:
            rec.remove()
    if rec.bwd_bad is None and rec.pending is not None:
        rec.bwd_bad = rec.pending
    if rec.bwd_bad is not None:
        origin, where, s, detail = rec.bwd_bad
        if origin == "loss":
            return _loss_location(rec, s, ev)
        ev.update(culprit=s.to_dict(), frames=[(n, f.to_dict()) for n, f in rec.bwd_frames])
        msg = (f"first non-finite gradient produced in the backward pass by {where}: {detail} "
               f"({s.describe()})" + _frames(list(rec.bwd_frames), "gradients"))
        return Location("backward", where, msg, (where,), ev)
    if rec.bwd_first is not None:
        where, s = rec.bwd_first
        ev.update(culprit=s.to_dict(), weak=True)
        msg = (f"first non-finite gradient seen at {where} ({s.describe()}); no module boundary "
               "isolates its producer" + _frames(list(rec.bwd_frames), "gradients"))
        return Location("backward", where, msg, (where,), ev)
    return _clean_location(rec, ev, loss_value, backward=True)


def _forward_location(rec: _Recorder, ev: dict) -> Location:
    origin, where, s, detail = rec.fwd_bad  # type: ignore[misc]
    frames = list(rec.fwd_frames)
    ev.update(culprit=s.to_dict(), frames=[(n, f.to_dict()) for n, f in frames])
    if origin == "input":
        msg = f"the batch holds NaN/Inf: model input {where} ({s.describe()})"
        return Location("input", where, msg, (where,), ev)
    why = detail or "its inputs were finite"
    msg = (f"first non-finite value produced in the forward pass by {where} ({why}; output "
           f"{s.describe()})" + _frames(frames, "outputs"))
    return Location("forward", where, msg, (where,), ev)


def _loss_location(rec: _Recorder, s: TStat, ev: dict) -> Location:
    frames = list(rec.fwd_frames)
    ev.update(culprit=s.to_dict(), frames=[(n, f.to_dict()) for n, f in frames])
    msg = (f"the forward pass is finite but the gradient flowing into the model's output is "
           f"non-finite ({s.describe()}): the loss function produced it"
           + _frames(frames, "outputs"))
    return Location("loss", LOSS_WHERE, msg, (LOSS_WHERE,), ev)


def _clean_location(rec: _Recorder, ev: dict, loss_value: float | None, *, backward: bool) -> Location:
    frames = list(rec.fwd_frames)
    ev["frames"] = [(n, f.to_dict()) for n, f in frames]
    if loss_value is not None and not math.isfinite(loss_value):
        msg = (f"the forward pass and the gradients are finite but the loss is {loss_value}: "
               "the loss function produced it" + _frames(frames, "outputs"))
        return Location("loss", LOSS_WHERE, msg, (LOSS_WHERE,), ev)
    what = "forward pass and backward pass" if backward else "forward pass"
    ev["reproduced"] = False
    return Location(None, "", f"the replayed {what} stayed finite", (), ev)


def parameters_location(bad: list[tuple[str, TStat]], *, optimizer: bool) -> Location:
    owners: list[str] = []
    for n, _ in bad:
        o = param_owner(n)
        if o not in owners:
            owners.append(o)
    n0, s0 = bad[0]
    names = ", ".join(clean_name(n) for n, _ in bad[:3]) + (" ..." if len(bad) > 3 else "")
    ev = {"params": [(clean_name(n), s.to_dict()) for n, s in bad[:16]], "count": len(bad)}
    if optimizer:
        msg = (f"parameters became non-finite in the last update although its gradients were "
               f"finite (the optimizer produced them): {names} ({s0.describe()})")
        return Location("optimizer", owners[0], msg, tuple(owners), ev)
    msg = (f"parameters were already non-finite before this step's forward: {names} "
           f"({s0.describe()})")
    return Location("parameters", owners[0], msg, tuple(owners), ev)
