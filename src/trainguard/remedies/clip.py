"""Gradient clipping remedies. Each decides a threshold on the host from the gradient norm the
probe already measured, then rescales all gradients with one fused ``_foreach_mul_``; nothing
is recomputed and nothing is done on steps that need no clipping.

* :class:`AdaptiveClip` (default): z-score of the log gradient norm against an exponential
  moving mean/variance with warm-up, after ZClip (Kumar et al. 2025, arXiv 2504.02507).
* :class:`FixedNormClip`: Pascanu et al. 2013's global-norm clipping at a fixed threshold
  (their threshold 1.0; ``clip_grad_norm_`` semantics).
* :class:`AGC`: unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets; timm's
  ``adaptive_clip_grad``): each unit's gradient is limited to ``clip_factor`` times its weight norm.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # torch is imported where a tensor is touched: the clippers' statistics
    import torch   # also serve the torch-free NumPy Monitor


def scale_grads(grads: Sequence["torch.Tensor"], coef: float) -> None:
    import torch
    if grads and coef != 1.0:
        torch._foreach_mul_(list(grads), coef)


class AdaptiveClip:
    """Clip when the gradient norm is an outlier against its own running statistics.

    The statistics are an exponential moving mean and variance of ``log(norm)`` (EMA 0.97 and
    25 warm-up steps, as in ZClip). The threshold is ``exp(mean + z * std)``; a norm above it
    is scaled down to it and enters the statistics at the threshold, so spikes do not inflate
    them. Log space because small-batch gradient norms are multiplicatively noisy. ``z`` = 4
    (ZClip uses 2.5 on raw norms) clipped 3 of 15,000 steps of 10 healthy runs in
    ``bench/calibrate_detectors.py`` and 0 at z = 5; any real explosion is orders of magnitude
    past it. A clip also needs a sudden jump, ``jump`` = 2x the previous step's norm: a
    gradual rise (edge-of-stability growth in full-batch GD, at most 1.3x per step measured)
    is left alone, see detect/spikes.py. ``max_norm`` optionally adds a fixed ceiling.
    """

    name = "adaptive"

    def __init__(self, z: float = 4.0, alpha: float = 0.97, warmup: int = 25,
                 max_norm: float | None = None, jump: float = 2.0) -> None:
        if not z > 0 or not 0 < alpha < 1:
            raise ValueError(f"AdaptiveClip expects z > 0 and 0 < alpha < 1; got z={z!r}, "
                             f"alpha={alpha!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive integer, got {warmup!r}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive or None, got {max_norm!r}")
        self.z, self.alpha, self.warmup, self.max_norm = z, alpha, warmup, max_norm
        self.jump = jump
        self.last = math.nan  # previous step's norm
        self.mean = 0.0  # of log(norm)
        self.var = 0.0
        self.count = 0
        self._warm: list[float] = []

    def threshold(self) -> float:
        cap = self.max_norm if self.max_norm is not None else math.inf
        if self.count < self.warmup:
            return cap
        return min(math.exp(min(self.mean + self.z * math.sqrt(max(self.var, 0.0)), 700.0)), cap)

    def coefficient(self, norm: float) -> float:
        """The factor to multiply gradients by (1.0 = leave alone); updates the statistics."""
        if not math.isfinite(norm) or norm <= 0:
            return 1.0
        thr = self.threshold()
        sudden = not (self.last > 0) or norm > self.jump * self.last
        if self.max_norm is not None and norm > self.max_norm:
            sudden = True  # the fixed ceiling always holds
        coef = thr / norm if norm > thr and sudden else 1.0
        self.last = norm
        self._observe(math.log(min(norm, thr)))
        return coef

    def rebase(self) -> None:
        """The loss changed (``guard.loss_changed()``, or found so after a rollback): the next
        norm is not compared with the last one, so a gradient scale that moved with the loss
        is not clipped as a sudden jump; the statistics then follow the new level through their
        EMA (0.97), a norm above the threshold entering them at the threshold."""
        self.last = math.inf

    def _observe(self, x: float) -> None:
        self.count += 1
        if self.count <= self.warmup:
            self._warm.append(x)
            if self.count == self.warmup:
                self.mean = sum(self._warm) / len(self._warm)
                self.var = sum((v - self.mean) ** 2 for v in self._warm) / len(self._warm)
                self._warm = []
            return
        d = x - self.mean
        self.mean += (1 - self.alpha) * d
        self.var = self.alpha * (self.var + (1 - self.alpha) * d * d)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count, "warm": list(self._warm),
                "last": self.last}

    def load_state_dict(self, s: dict) -> None:
        self.mean, self.var, self.count = s["mean"], s["var"], s["count"]
        self._warm = list(s.get("warm", []))
        self.last = s.get("last", math.nan)

    def __repr__(self) -> str:
        return f"AdaptiveClip(z={self.z}, alpha={self.alpha}, warmup={self.warmup}, max_norm={self.max_norm})"


class FixedNormClip:
    name = "norm"

    def __init__(self, max_norm: float = 1.0) -> None:
        if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def threshold(self) -> float:
        return self.max_norm

    def coefficient(self, norm: float) -> float:
        if not math.isfinite(norm) or norm <= self.max_norm:
            return 1.0
        return self.max_norm / (norm + 1e-6)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, s: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedNormClip(max_norm={self.max_norm})"


class AGC:
    """Unit-wise clipping: ``g_i <- g_i * min(1, clip_factor * max(|W_i|, eps) / |g_i|)``."""

    name = "agc"

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        if not clip_factor > 0 or not eps > 0:
            raise ValueError(f"AGC expects clip_factor > 0 and eps > 0, got {clip_factor!r}, {eps!r}")
        self.clip_factor, self.eps = clip_factor, eps

    def threshold(self) -> float:
        return math.inf

    def coefficient(self, norm: float) -> float:
        return 1.0

    def apply(self, params: Sequence["torch.Tensor"]) -> int:
        """Clip in place; returns the number of units clipped (0 means nothing changed)."""
        import torch
        with torch.no_grad():
            return self._apply(params)

    def _apply(self, params: Sequence["torch.Tensor"]) -> int:
        import torch
        clipped = torch.zeros((), dtype=torch.int64)
        for p in params:
            if p.grad is None:
                continue
            dims = tuple(range(1, p.dim())) if p.dim() > 1 else None
            wn = torch.linalg.vector_norm(p.detach().float(), dim=dims, keepdim=p.dim() > 1).clamp_min(self.eps)
            gn = torch.linalg.vector_norm(p.grad.float(), dim=dims, keepdim=p.dim() > 1)
            maxn = wn * self.clip_factor
            over = gn > maxn
            factor = torch.where(over, maxn / gn.clamp_min(1e-6), torch.ones_like(gn))
            p.grad.mul_(factor.to(p.grad.dtype))
            clipped = clipped + over.sum().cpu()
        return int(clipped)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, s: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps})"


def make_clipper(clip: object) -> AdaptiveClip | FixedNormClip | AGC | None:
    """``"adaptive"`` (default), ``"norm"`` (fixed 1.0), a float (fixed at that norm),
    ``"agc"``, ``None``/``False`` (no clipping), or a clipper instance."""
    if clip is None or clip is False:
        return None
    if isinstance(clip, (AdaptiveClip, FixedNormClip, AGC)):
        return clip
    if clip == "adaptive":
        return AdaptiveClip()
    if clip == "norm":
        return FixedNormClip(1.0)
    if clip == "agc":
        return AGC()
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        return FixedNormClip(float(clip))
    raise ValueError(f"clip must be 'adaptive', 'norm', 'agc', a positive number, None or a "
                     f"clipper instance; got {clip!r}")
