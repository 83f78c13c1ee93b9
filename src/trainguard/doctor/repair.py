"""``repair()``: structural repair informed by the diagnosis (AUTOTRAINER-style, ICSE 2021).

1. Build the model with ``model_fn()`` and diagnose it with :func:`doctor` (on copies).
2. Train it as given for ``steps`` steps: the baseline metric.
3. Try remedies in the order the diagnosis ranks them (swap activations, re-initialise,
   insert normalisation, zero-init residual branches, set the LR from the curvature limit /
   range test, change the optimizer or its epsilon). Each trial retrains from a fresh
   ``model_fn()`` for ``steps`` steps. After a structural change the curvature limit is
   re-measured and an LR above twice the new limit is lowered to half of it.
4. Stop at the first trial that resolves the problem (better than the baseline by
   ``RESOLVE_MARGIN`` and a training loss that fell by ``RESOLVE_DROP``), or after
   ``max_trials``; keep the best model and report every change.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, cast

import numpy as np
import torch
from torch import nn

from ..clone import deepcopy_model
from ..stats import activation_kind
from ._common import (Batch, DoctorInputError, LossFn, as_batch, check_loss_fn, clone_optimizer,
                      forward, has_training_step, lr_of, model_device, preserved_rng, probe_batch,
                      set_lr, train_steps)
from .propagation import residual_blocks

#: Every remedy ``repair`` can apply (and that a random baseline draws from).
REMEDY_MENU = (
    "act:relu+init:he", "act:elu+init:he", "act:leaky", "init:he", "init:xavier", "init:orthogonal", "init:lsuv",
    "init:zero_last", "norm:batchnorm", "norm:layernorm", "lr:curvature", "opt:adam",
)

#: A trial resolves the problem when its metric beats the baseline by this relative margin
#: (or the baseline is non-finite) ...
RESOLVE_MARGIN = 0.10
#: ... and its training loss fell to at most this fraction of its initial value (mean of the
#: last vs the first tenth of the run).
RESOLVE_DROP = 0.7

#: Steps of the short probe run at the user's LR after a structural change; a loss that
#: becomes non-finite or exceeds 4× its start (the range test's rule, §3.6) means the
#: changed model needs a lower LR.
PROBE_STEPS = 20

#: Finding kinds that name a broken structure (init, activation, normalisation); a trial
#: after which one of these is still detected does not count as resolved.
STRUCTURAL_KINDS = frozenset({"vanishing_gradient", "activation_collapse", "activation_explosion",
                              "grad_explosion", "dead_units"})

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SATURATING = ("sigmoid", "tanh", "hardtanh", "hardsigmoid")


@dataclass
class Trial:
    remedy: str
    changes: list[str]
    metric: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    resolved: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["losses"] = self.losses[:: max(1, len(self.losses) // 100)]
        return d


@dataclass
class RepairResult:
    model: nn.Module
    metric: float
    baseline_metric: float
    #: human-readable list of what was changed (empty when the baseline was kept)
    changes: list[str]
    remedy: str  # the winning remedy key ("" = baseline kept)
    trials: list[Trial] = field(default_factory=list)
    report: Any = None  # the DoctorReport that ordered the trials
    higher_is_better: bool = False
    seconds: float = 0.0
    baseline_seconds: float = 0.0
    #: the time of one full-length training run (seconds per step measured over every
    #: training run here × steps): the unit for "time relative to one healthy run"
    run_seconds: float = 0.0

    @property
    def time_ratio(self) -> float:
        """Total repair time (diagnosis, baseline and trials) / one full training run."""
        return self.seconds / self.run_seconds if self.run_seconds > 0 else math.nan

    @property
    def improved(self) -> bool:
        return _better(self.metric, self.baseline_metric, self.higher_is_better)

    def summary(self) -> str:
        arrow = "higher" if self.higher_is_better else "lower"
        lines = [f"repair: metric {self.baseline_metric:.4g} -> {self.metric:.4g} ({arrow} is better)"
                 f" in {len(self.trials)} trial(s), {self.seconds:.1f}s"]
        lines += [f"  changed: {c}" for c in self.changes] or ["  no change kept"]
        for t in self.trials:
            lines.append(f"  trial {t.remedy}: metric {t.metric:.4g}"
                         + (f" (error: {t.error})" if t.error else "") + (" resolved" if t.resolved else ""))
        return "\n".join(lines)

    __str__ = summary


# -- remedies -------------------------------------------------------------------------------

def _swap_activations(model: nn.Module, kinds: Sequence[str], factory: Callable[[], nn.Module]) -> dict[str, int]:
    swapped: dict[str, int] = {}

    def rec(mod: nn.Module) -> None:
        for name, child in list(mod.named_children()):
            k = activation_kind(child)
            if k in kinds:
                setattr(mod, name, factory())
                swapped[type(child).__name__] = swapped.get(type(child).__name__, 0) + 1
            else:
                rec(child)
    rec(model)
    return swapped


def _weighted(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _WEIGHTED)]


def _init(model: nn.Module, how: str, act: str = "relu") -> int:
    n = 0
    for m in _weighted(model):
        w = cast(torch.Tensor, m.weight)
        b = cast("torch.Tensor | None", m.bias)
        with torch.no_grad():
            if how == "he":
                if act == "leaky":
                    nn.init.kaiming_normal_(w, a=0.1, nonlinearity="leaky_relu")
                else:
                    nn.init.kaiming_normal_(w, nonlinearity="relu")
            elif how == "xavier":
                nn.init.xavier_uniform_(w)
            elif how == "orthogonal":
                nn.init.orthogonal_(w, gain=math.sqrt(2.0) if act == "relu" else 1.0)
            if b is not None:
                nn.init.zeros_(b)
        n += 1
    return n


def _lsuv(model: nn.Module, batch: Batch, device: torch.device, tol: float = 0.1, iters: int = 10) -> int:
    """Mishkin & Matas 2015: orthonormal init, then per layer (forward order) rescale W so the
    layer's output variance is 1 on one batch, |Var−1| < tol, ≤ iters rounds (§2.8)."""
    _init(model, "orthogonal", act="linear")
    layers = _weighted(model)
    for m in layers:
        out: dict[str, torch.Tensor] = {}
        h = m.register_forward_hook(lambda _m, _i, o: out.__setitem__("o", o.detach()))
        try:
            for _ in range(iters):
                with torch.no_grad():
                    forward(model, batch, device)
                v = float(out["o"].float().var()) if "o" in out else math.nan
                if not math.isfinite(v) or v <= 0 or abs(v - 1) < tol:
                    break
                with torch.no_grad():
                    cast(torch.Tensor, m.weight).div_(math.sqrt(v))
        finally:
            h.remove()
    return len(layers)


def _zero_last(model: nn.Module) -> int:
    n = 0
    for _, block in residual_blocks(model):
        ws = [m for m in block.modules() if isinstance(m, _WEIGHTED)]
        if ws:
            with torch.no_grad():
                ws[-1].weight.zero_()
                if ws[-1].bias is not None:
                    ws[-1].bias.zero_()
            n += 1
    return n


def _insert_norm(model: nn.Module, kind: str) -> int:
    """Linear/Conv → Sequential(layer, norm) for every weighted layer except the last one."""
    layers = _weighted(model)
    if len(layers) < 2:
        return 0
    targets = {id(m) for m in layers[:-1]}
    count = 0

    def make(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.Linear):
            return nn.BatchNorm1d(m.out_features) if kind == "batchnorm" else nn.LayerNorm(m.out_features)
        c = int(cast(int, m.out_channels))
        if kind == "batchnorm":
            norms: dict[type, Any] = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d,
                                      nn.Conv3d: nn.BatchNorm3d}
            return cast(nn.Module, norms[type(m)](c))
        return nn.GroupNorm(1, c)

    def rec(mod: nn.Module) -> None:
        nonlocal count
        for name, child in list(mod.named_children()):
            if id(child) in targets:
                dev = cast(torch.Tensor, child.weight).device
                setattr(mod, name, nn.Sequential(child, make(child).to(dev)))
                count += 1
            else:
                rec(child)
    rec(model)
    return count


def apply_remedy(model: nn.Module, remedy: str, *, batch: Batch | None = None,
                 suggested_lr: float | None = None) -> tuple[list[str], dict[str, Any]]:
    """Apply ``remedy`` (keys of :data:`REMEDY_MENU`, ``lr:<value>``, joined with ``+``) to
    ``model`` in place. Returns (changes in words, optimizer overrides {"lr":..., "adam":...,
    "eps":...}). A part that finds nothing to change adds no change line."""
    device = model_device(model)
    changes: list[str] = []
    opt: dict[str, Any] = {}
    acts_now = {activation_kind(m) for m in model.modules()} - {None}
    for part in remedy.split("+"):
        part = part.strip()
        if part == "act:relu":
            sw = _swap_activations(model, _SATURATING, nn.ReLU)
            changes += [f"{k} -> ReLU in {v} layers" for k, v in sw.items()]
            acts_now = {activation_kind(m) for m in model.modules()} - {None}
        elif part == "act:elu":
            elu_from: Sequence[str] = (("relu", "relu6", "leaky_relu")
                                       if acts_now & {"relu", "relu6", "leaky_relu"} else _SATURATING)
            sw = _swap_activations(model, elu_from, nn.ELU)
            changes += [f"{k} -> ELU in {v} layers" for k, v in sw.items()]
            acts_now = {activation_kind(m) for m in model.modules()} - {None}
        elif part == "act:leaky":
            src = ("relu", "relu6") if acts_now & {"relu", "relu6"} else _SATURATING
            sw = _swap_activations(model, src, lambda: nn.LeakyReLU(0.1))
            changes += [f"{k} -> LeakyReLU(0.1) in {v} layers" for k, v in sw.items()]
            acts_now = {activation_kind(m) for m in model.modules()} - {None}
        elif part.startswith("init:"):
            how = part[5:]
            act = "leaky" if "leaky_relu" in acts_now else ("relu" if acts_now & {"relu", "relu6", "elu", "gelu", "silu"} else "linear")
            if how in ("he", "xavier", "orthogonal"):
                n = _init(model, how, act)
                label = {"he": "He (kaiming_normal)", "xavier": "Xavier (xavier_uniform)",
                         "orthogonal": f"orthogonal (gain {'√2' if act == 'relu' else '1'})"}[how]
                if n:
                    changes.append(f"{label} init in {n} layers")
            elif how == "lsuv":
                if batch is None:
                    raise DoctorInputError("init:lsuv needs a batch")
                n = _lsuv(model, batch, device)
                if n:
                    changes.append(f"LSUV init in {n} layers")
            elif how == "zero_last":
                n = _zero_last(model)
                if n:
                    changes.append(f"zero-init the last layer of {n} residual branches (Fixup/ReZero)")
            else:
                raise DoctorInputError(f"unknown remedy {part!r}")
        elif part in ("norm:batchnorm", "norm:layernorm"):
            n = _insert_norm(model, part[5:])
            if n:
                label = "BatchNorm" if part.endswith("batchnorm") else "LayerNorm"
                changes.append(f"{label} inserted after {n} layers")
            model.to(device)
        elif part.startswith("lr:"):
            v = part[3:]
            lr = suggested_lr if v == "curvature" else float(v)
            if lr is not None and math.isfinite(lr) and lr > 0:
                opt["lr"] = lr
        elif part == "opt:adam":
            opt["adam"] = True
        elif part == "opt:eps":
            opt["eps"] = 1e-15
        elif part:
            raise DoctorInputError(f"unknown remedy {part!r}; known: {', '.join(REMEDY_MENU)}")
    return changes, opt


# -- training -------------------------------------------------------------------------------

def _build_opt(optimizer_fn: Callable, model: nn.Module, over: dict[str, Any]) -> tuple[torch.optim.Optimizer, list[str]]:
    changes = []
    opt = optimizer_fn(model.parameters())
    if not isinstance(opt, torch.optim.Optimizer):
        raise DoctorInputError("optimizer_fn(params) must return a torch.optim.Optimizer, got "
                               f"{type(opt).__name__}")
    if over.get("adam"):
        old = type(opt).__name__
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        changes.append(f"optimizer {old} -> Adam(lr=1e-3)")
    if "eps" in over:
        for g in opt.param_groups:
            if "eps" in g:
                changes.append(f"eps {g['eps']:g} -> {over['eps']:g}")
                g["eps"] = over["eps"]
                break
        for g in opt.param_groups:
            if "eps" in g:
                g["eps"] = over["eps"]
    if "lr" in over:
        old_lr = lr_of(opt)
        ratio = over["lr"] / old_lr if old_lr > 0 else 1.0
        set_lr(opt, [float(g["lr"]) * ratio for g in opt.param_groups])
        changes.append(f"lr {old_lr:.3g} -> {over['lr']:.3g}")
    return opt, changes


def _train(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, batches: Sequence[Batch],
           steps: int, device: torch.device) -> list[float]:
    model.train()
    return train_steps(model, opt, loss_fn, list(batches), steps, device)


def _tail(losses: list[float], frac: float = 0.1) -> float:
    if not losses or not math.isfinite(losses[-1]):
        return math.nan
    k = max(1, int(len(losses) * frac))
    return float(np.mean(losses[-k:]))


def _better(a: float, b: float, higher: bool) -> bool:
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if higher else a < b


def _resolved(metric: float, base: float, losses: list[float], higher: bool) -> bool:
    if not math.isfinite(metric):
        return False
    if math.isfinite(base):
        margin = RESOLVE_MARGIN * max(abs(base), 1e-12)
        if not (metric > base + margin if higher else metric < base - margin):
            return False
    k = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:k])), _tail(losses)
    return math.isfinite(last) and last <= RESOLVE_DROP * first


def plan_remedies(report: Any) -> list[str]:
    """Remedy keys in the order the diagnosis ranks them; LR fixes first when the LR is the
    problem."""
    keys: list[str] = []
    lr_problem = any(f.kind in ("lr_too_high", "divergence", "nonfinite") and f.severity == "error"
                     for f in report.findings)
    structural = any(f.kind in STRUCTURAL_KINDS and f.severity == "error" for f in report.findings)
    for p in report.prescriptions:
        if p.remedy and p.remedy not in keys and not p.remedy.startswith("lr:"):
            keys.append(p.remedy)
    if lr_problem and report.suggested_lr and math.isfinite(report.suggested_lr):
        # the LR goes first unless a broken structure explains the curvature (then the
        # structural fix comes first and the LR is re-checked after it)
        keys.insert(1 if structural and keys else 0, "lr:curvature")
    for p in report.prescriptions:
        if p.remedy.startswith("lr:") and "lr:curvature" not in keys and p.remedy not in keys:
            keys.append(p.remedy)
    return keys


def still_sick(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device) -> list[str]:
    """Re-detect (AUTOTRAINER-style) on a trained candidate: the structural finding kinds
    that persist after training (one forward/backward with hooks on a copy)."""
    from ._common import clone_model, freeze_dropout
    from .propagation import findings_from, measure, verdicts
    m = clone_model(model)
    freeze_dropout(m)
    try:
        with preserved_rng():
            stats, loss = measure(m, loss_fn, batch, device)
    except RuntimeError:
        return ["nonfinite"]
    if not math.isfinite(loss):
        return ["nonfinite"]
    return sorted({f.kind for f in findings_from(verdicts(stats, None), m)
                   if f.kind in STRUCTURAL_KINDS and f.severity == "error"})


def _metric_of(model: nn.Module, metric: Callable | None, losses: list[float]) -> float:
    if metric is None:
        return _tail(losses)
    if losses and not math.isfinite(losses[-1]):
        return math.nan
    model.eval()
    try:
        with torch.no_grad():
            v = float(metric(model))
    finally:
        model.train()
    return v


def repair(model_fn: Callable[[], nn.Module], optimizer_fn: Callable[[Any], torch.optim.Optimizer],
           loss_fn: LossFn, data: Iterable, steps: int = 600, metric: Callable[[nn.Module], float] | None = None,
           *, higher_is_better: bool | None = None, max_trials: int = 4, seed: int = 0,
           plan: Sequence[str] | None = None, verbose: bool = False,
           progress: bool | None = None) -> RepairResult:
    """Diagnose, then retrain from ``model_fn()`` with the remedies the diagnosis ranks first.

    ``optimizer_fn(params)`` builds the optimizer (e.g. ``lambda p: torch.optim.SGD(p, lr=0.1)``).
    ``data``: an iterable of ``(x, y)`` batches; up to ``steps`` are read once and cycled.
    ``loss_fn=None``: the model returns its own loss, as in :func:`trainguard.doctor.doctor`.
    ``metric(model) -> float`` scores a trained model (``higher_is_better`` defaults to True
    when a metric is given); without it the mean training loss of the last tenth of the run is
    used (lower is better). ``plan`` overrides the diagnosed remedy order (used by the
    random-remedy baseline in ``bench/doctor_repair.py``). ``progress``: print each phase and
    trial with an ETA on stderr (None: when stderr is a terminal).
    """
    from ._doctor import doctor
    from .curvature import sharpness

    t0 = time.perf_counter()
    if not callable(model_fn) or not callable(optimizer_fn):
        raise DoctorInputError("repair() needs model_fn() -> nn.Module and optimizer_fn(params) -> Optimizer")
    if steps < 1:
        raise DoctorInputError(f"steps must be ≥ 1, got {steps}")
    higher = (metric is not None) if higher_is_better is None else bool(higher_is_better)
    check_loss_fn(loss_fn)
    try:
        raw = list(itertools.islice(iter(data), steps))
    except TypeError:
        raise DoctorInputError("data must be an iterable of (x, y) batches") from None
    if not raw:
        raise DoctorInputError("data yielded no batch")

    def fresh() -> nn.Module:
        torch.manual_seed(seed)
        m = model_fn()
        if not isinstance(m, nn.Module):
            raise DoctorInputError(f"model_fn() must return an nn.Module, got {type(m).__name__}")
        return m

    from ..progress import Progress
    prog = Progress(2 + max_trials, "repair", enabled=progress)
    prog.__enter__()
    m0 = fresh()
    whole = loss_fn is None and has_training_step(m0)
    batches = [as_batch(b, i, loss_fn, whole) for i, b in enumerate(raw)]
    device = model_device(m0)
    probe = probe_batch(batches[:32])
    prog.start("diagnosis (doctor)")
    with preserved_rng():
        report = doctor(m0, loss_fn, batches[:32], optimizer=optimizer_fn(m0.parameters()),
                        precision=False, seed=seed)
    # baseline
    prog.start(f"baseline run ({steps} steps)")
    tb = time.perf_counter()
    opt0 = optimizer_fn(m0.parameters())
    torch.manual_seed(seed + 1)
    base_losses = _train(m0, opt0, loss_fn, batches, steps, device)
    base_metric = _metric_of(m0, metric, base_losses)
    base_seconds = time.perf_counter() - tb
    train_seconds, train_steps_done = base_seconds, len(base_losses)
    if verbose:
        print(f"[repair] baseline metric {base_metric:.4g}; findings {report.kinds}")
    best_model, best_metric, best_changes, best_key = m0, base_metric, [], ""
    trials: list[Trial] = []
    keys = list(plan) if plan is not None else plan_remedies(report)
    if plan is None and report.healthy and not keys:
        keys = []
    prog.total = 2 + len(keys[:max_trials])
    for key in keys[:max_trials]:
        prog.start(f"trial {key}")
        ts = time.perf_counter()
        err = None
        changes: list[str] = []
        losses: list[float] = []
        m = None
        try:
            m = fresh()
            changes, over = apply_remedy(m, key, batch=probe, suggested_lr=report.suggested_lr)
            m.to(device)
            opt, oc = _build_opt(optimizer_fn, m, over)
            changes += oc
            structural = "lr" not in over and not key.startswith(("opt:", "lr:")) and bool(changes)
            lowered = False

            def lower_lr(m: nn.Module, opt: torch.optim.Optimizer, when: str) -> None:
                """Set the LR from the changed model's curvature limit (half of it, as the
                doctor suggests; a tenth for adaptive optimizers)."""
                nonlocal lowered
                with preserved_rng():
                    c = sharpness(_copy(m), loss_fn, probe, device, opt, lr_of(opt), seed=seed)
                if math.isfinite(c.max_stable_lr) and c.max_stable_lr > 0:
                    new_lr = 0.5 * c.max_stable_lr if not c.preconditioned else lr_of(opt) / 10
                    changes.append(f"lr {lr_of(opt):.3g} -> {new_lr:.3g} (diverged {when}; "
                                   f"curvature limit {c.max_stable_lr:.3g} after the change)")
                    set_lr(opt, [float(g['lr']) * new_lr / lr_of(opt) for g in opt.param_groups])
                    lowered = True

            if structural:
                # the structure changed: a short probe at the user's LR; if it diverges, set
                # the LR from the new curvature limit
                probe_m = _copy(m)
                probe_o = clone_optimizer(opt, m, probe_m)
                pl = train_steps(probe_m, probe_o, loss_fn, batches, PROBE_STEPS, device)
                if _diverged(pl):
                    lower_lr(m, opt, f"in {PROBE_STEPS} steps")
                del probe_m, probe_o
            if not changes:
                err = "not applicable (nothing to change)"
            else:
                start = _copy(m) if structural and not lowered else None
                torch.manual_seed(seed + 1)
                tt = time.perf_counter()
                losses = _train(m, opt, loss_fn, batches, steps, device)
                if start is not None and _diverged(losses):
                    # it diverged after the probe: once more from the changed start, at the
                    # LR of the new curvature limit (issue #13: ELU + He on a 30-layer net
                    # went non-finite after step 20 on one seed and the trial was lost)
                    m = start
                    opt = _build_opt(optimizer_fn, m, over)[0]
                    lower_lr(m, opt, "during training")
                    if lowered:
                        torch.manual_seed(seed + 1)
                        losses = _train(m, opt, loss_fn, batches, steps, device)
                train_seconds += time.perf_counter() - tt
                train_steps_done += len(losses)
            val = _metric_of(m, metric, losses) if losses else math.nan
        except (RuntimeError, ValueError, KeyError) as e:  # a remedy that does not fit the model
            err = f"{type(e).__name__}: {e}"[:200]
            val = math.nan
        t = Trial(key, changes, val, _tail(losses), losses, time.perf_counter() - ts, err)
        t.resolved = err is None and _resolved(val, base_metric, losses, higher)
        if t.resolved and m is not None:
            sick = still_sick(m, loss_fn, probe, device)
            if sick:
                t.resolved = False
                t.error = None
                t.changes = t.changes + [f"(still detected after training: {', '.join(sick)})"]
        trials.append(t)
        if verbose:
            print(f"[repair] {key}: {val:.4g} {changes} {err or ''}")
        if err is None and m is not None and _better(val, best_metric, higher):
            best_model, best_metric, best_changes, best_key = m, val, changes, key
        if t.resolved:
            break
    best_changes = [c for c in best_changes if not c.startswith("(still detected")]
    per_step = train_seconds / max(1, train_steps_done)
    prog.close()
    return RepairResult(best_model, best_metric, base_metric, best_changes, best_key, trials,
                        report, higher, time.perf_counter() - t0, base_seconds, per_step * steps)


def _copy(m: nn.Module) -> nn.Module:
    return deepcopy_model(m)


def _diverged(losses: list[float]) -> bool:
    return bool(losses) and (not all(math.isfinite(v) for v in losses)
                             or losses[-1] > 4.0 * max(losses[0], 1e-12))
