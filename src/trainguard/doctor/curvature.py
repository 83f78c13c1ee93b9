"""Curvature: the top Hessian eigenvalue by Hessian-vector-product power iteration on a fixed
probe batch, and the learning-rate stability limit it implies for the optimizer in use
(research/mechanisms.md §3.1–3.3).

* GD: stable iff η·λ_max < 2.
* Heavy-ball momentum β: λ_max < (2+2β)/η; Nesterov: λ_max < (2+2β)/((1+2β)η) (Cohen 2022).
* Adam/AdamW (β1): preconditioned sharpness λ_max(P^-1/2 H P^-1/2) < (2+2β1)/((1−β1)η),
  i.e. 38/η at β1=0.9, with P = diag(√v̂ + ε) from the optimizer's state (bias-corrected).
* RMSprop: P from ``square_avg`` (+ε), heavy-ball limit on the preconditioned sharpness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ._common import Batch, LossFn, loss_of, trainable

#: Power-iteration budget: "10–20 iterations usually suffice for a monitoring signal"
#: (mechanisms.md §3.3; PyHessian-style tools use up to 100 with tol 1e-3).
POWER_ITERS = 20
#: Relative change of the Rayleigh quotient at which power iteration stops (PyHessian's 1e-3).
POWER_TOL = 1e-3


@dataclass
class Curvature:
    lambda_max: float  # top eigenvalue of H (or of P^-1/2 H P^-1/2 when preconditioned)
    preconditioned: bool
    optimizer: str
    threshold: float  # c such that stability requires lambda_max < c / lr
    max_stable_lr: float
    iterations: int
    converged: bool
    lambda_raw: float = math.nan  # unpreconditioned λ_max (always measured)
    history: list[float] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _math_attention():  # type: ignore[no-untyped-def]
    """Scaled-dot-product attention through the math kernel, the one with a double backward
    (the fused CPU flash kernel raises "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover - older torch
        import contextlib
        return contextlib.nullcontext()


#: Relative step of the finite-difference Hessian-vector product (central differences),
#: ``eps = FD_STEP * (1 + ||theta||) / ||v||``: the usual sqrt(machine eps) scale for fp32
#: (Pearlmutter 1994, section 2; Nocedal & Wright, section 8.1).
FD_STEP = 1e-3


def _fd_hvp_fn(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device
               ) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """First-order fallback: Hv ~ (g(theta + e v) - g(theta - e v)) / 2e, two backward
    passes per product, for models whose ops lack a double backward. Runs on the doctor's
    copy of the model; the parameters are restored exactly after each product."""
    params = trainable(model)

    def grad_at() -> list[torch.Tensor]:
        loss = loss_of(model, loss_fn, batch, device)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(gs, params)]

    theta = math.sqrt(_dot([p.detach() for p in params], [p.detach() for p in params]))

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        vn = math.sqrt(_dot(v, v)) or 1.0
        e = FD_STEP * (1.0 + theta) / vn
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.add_(d, alpha=e)
            gp = grad_at()
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.add_(d, alpha=-2 * e)
            gm = grad_at()
        finally:
            with torch.no_grad():
                for p, s0 in zip(params, saved):
                    p.copy_(s0)
        return [(a - b) / (2 * e) for a, b in zip(gp, gm)]

    return hvp


def _hvp_fn(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device
            ) -> tuple[Callable[[list[torch.Tensor]], list[torch.Tensor]], list[torch.Tensor], float, str]:
    """Exact Hessian-vector products by double backward (attention through the math kernel);
    when an op of the model has no double backward, finite differences of gradients. The
    last value says which (``""`` for exact, else a note for the report)."""
    params = trainable(model)
    with _math_attention():
        loss = loss_of(model, loss_fn, batch, device)
        raw = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(raw, params)]

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        dot = sum((g * vi).sum() for g, vi in zip(grads, v))
        if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
            return [torch.zeros_like(p) for p in params]
        hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
        return [h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)]

    try:
        hvp([torch.zeros_like(p) + 1e-3 for p in params])  # probe: does double backward exist?
    except RuntimeError as e:
        note = (f"finite-difference Hessian-vector products (the model has an op without a "
                f"double backward: {str(e).splitlines()[0][:120]})")
        del grads
        return _fd_hvp_fn(model, loss_fn, batch, device), [], float(loss.detach()), note
    return hvp, [g.detach() for g in grads], float(loss.detach()), ""


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def power_iteration(op: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                    like: list[torch.Tensor], iters: int = POWER_ITERS, tol: float = POWER_TOL,
                    seed: int = 0, init: list[torch.Tensor] | None = None, shift: float = 0.0
                    ) -> tuple[float, list[torch.Tensor], int, bool, list[float]]:
    """Largest-magnitude eigenvalue of the symmetric operator ``op - shift·I``; returns
    (eigenvalue of op, eigenvector, iterations, converged, Rayleigh-quotient history)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = init if init is not None else [torch.randn(p.shape, generator=gen).to(p) for p in like]
    n = math.sqrt(_dot(v, v)) or 1.0
    v = [x / n for x in v]
    lam, prev, hist, conv, it = 0.0, None, [], False, 0
    for it in range(1, iters + 1):
        hv = op(v)
        if shift:
            hv = [h - shift * x for h, x in zip(hv, v)]
        lam = _dot(v, hv)
        hist.append(lam + shift)
        n = math.sqrt(_dot(hv, hv))
        if not math.isfinite(n) or n == 0:
            break
        v = [h / n for h in hv]
        if prev is not None and abs(lam - prev) <= tol * max(abs(lam), 1e-12):
            conv = True
            break
        prev = lam
    return lam + shift, v, it, conv, hist


def _top_eig(op, like, seed) -> tuple[float, list[torch.Tensor], int, bool, list[float]]:
    lam, v, it, conv, hist = power_iteration(op, like, seed=seed)
    if lam < 0:  # dominant eigenvalue negative: shift to find the top of the spectrum
        lam2, v2, it2, conv2, hist2 = power_iteration(op, like, seed=seed + 1, shift=lam)
        return lam2, v2, it + it2, conv2, hist + hist2
    return lam, v, it, conv, hist


def optimizer_limit(opt: torch.optim.Optimizer | None) -> tuple[str, float, bool]:
    """(optimizer kind, c, preconditioned): stability requires λ < c/η."""
    if opt is None:
        return "gd", 2.0, False
    name = type(opt).__name__.lower()
    g = opt.param_groups[0]
    if "adam" in name:  # Adam, AdamW, NAdam, Adamax...
        b1 = float(g.get("betas", (0.9, 0.999))[0])
        return name, (2 + 2 * b1) / max(1e-12, 1 - b1), True
    if "rmsprop" in name:
        mu = float(g.get("momentum", 0.0))
        return name, 2 + 2 * mu, True
    mu = float(g.get("momentum", 0.0) or 0.0)
    damp = float(g.get("dampening", 0.0) or 0.0)
    if mu > 0 and g.get("nesterov", False):
        return "sgd-nesterov", (2 + 2 * mu) / (1 + 2 * mu), False
    if mu > 0:
        # dampening scales the effective step by (1 - dampening)
        return "sgd-momentum", (2 + 2 * mu) / max(1e-12, 1 - damp), False
    return ("sgd" if "sgd" in name else name), 2.0, False


def preconditioner(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """diag(sqrt(v_hat) + eps) for each of ``params`` (matched to the optimizer's state by
    identity, not position: weight-decay parameter groups list the parameters in another
    order than the model), None when some parameter has no such state."""
    out = []
    name = type(opt).__name__.lower()
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for p in params:
        group = group_of.get(id(p))
        st = opt.state.get(p, {}) if group is not None else {}
        if group is None:
            return None
        eps = float(group.get("eps", 1e-8))
        if "exp_avg_sq" in st:
            v = st["exp_avg_sq"].detach().float()
            step = st.get("step", 1)
            step = float(step.item() if isinstance(step, torch.Tensor) else step)
            b2 = float(group.get("betas", (0.9, 0.999))[1])
            bc = 1 - b2 ** max(step, 1.0)
            out.append((v / bc).sqrt() + eps)
        elif "square_avg" in st and "rmsprop" in name:
            out.append(st["square_avg"].detach().float().sqrt() + eps)
        else:
            return None
    return out


def sharpness(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device,
              opt: torch.optim.Optimizer | None, lr: float, *, opt_for_P: torch.optim.Optimizer | None = None,
              seed: int = 0) -> Curvature:
    """λ_max and the stability limit for ``opt`` at the current parameters of ``model``.

    ``opt_for_P`` is an optimizer over ``model``'s parameters whose state supplies the
    preconditioner (after a few steps); ``opt`` supplies the type and hyper-parameters.
    """
    params = trainable(model)
    hvp, _, _, note = _hvp_fn(model, loss_fn, batch, device)
    lam_raw, _, it_raw, conv_raw, hist_raw = _top_eig(hvp, params, seed)
    kind, c, pre = optimizer_limit(opt)
    lam, it, conv, hist = lam_raw, it_raw, conv_raw, hist_raw
    if pre:
        P = preconditioner(opt_for_P, params) if opt_for_P is not None else None
        if P is not None and len(P) == len(params):
            isq = [1.0 / p.sqrt() for p in P]

            def op(v: list[torch.Tensor]) -> list[torch.Tensor]:
                hv = hvp([a * b for a, b in zip(isq, v)])
                return [a * b for a, b in zip(isq, hv)]

            lam, _, it, conv, hist = _top_eig(op, params, seed)
        else:
            note = "; ".join(x for x in (note, "no optimizer state for the preconditioner; "
                                         "limit uses the raw Hessian") if x)
            pre = False
    lim = c / lam if lam > 0 and math.isfinite(lam) else math.inf
    return Curvature(lam, pre, kind, c, lim, it, conv, lam_raw, hist, note)


def directional_curvature(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device,
                          direction: list[torch.Tensor]) -> float:
    """dᵀHd / dᵀd along ``direction`` (one HVP); used for McCandlish's ε_max = |G|²/GᵀHG."""
    hvp, _, _, _ = _hvp_fn(model, loss_fn, batch, device)
    hd = hvp(direction)
    dd = _dot(direction, direction)
    return _dot(direction, hd) / dd if dd > 0 else math.nan


def top_hessian_eigenvalue(model: nn.Module, loss_fn: Callable[[], torch.Tensor],
                           iters: int = 30, seed: int = 0) -> float:
    """lambda_max of the loss Hessian by plain power iteration on Hessian-vector products
    (Pearlmutter 1994; research/mechanisms.md section 3.3). ``loss_fn()`` computes the loss
    on a fixed batch; one graph with ``create_graph=True`` serves every iteration. Used by
    the demo and the zoo to place learning rates at a multiple of 2/lambda."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    lam = 0.0
    for _ in range(iters):
        norm = math.sqrt(sum(float((x * x).sum()) for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
        v = [h.detach() for h in hv]
    return lam
