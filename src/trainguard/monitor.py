"""``Monitor``: the decision core with a plain-numbers face, for loops that update parameters
themselves (NumPy gradient descent; PyTorch loops with ``p.data.add_(p.grad, alpha=-lr)`` and no
``torch.optim`` optimizer).

    mon = Monitor(params={"w": w, "b": b})          # arrays by reference: rollback restores in place
    for i in range(steps):
        ...                                          # the user's forward, loss, gradients
        d = mon.step(loss, grads={"w": gw, "b": gb}, lr=lr)
        if d.apply:
            w -= lr * d.lr_scale * d.clip_scale * gw
            b -= lr * d.lr_scale * d.clip_scale * gb

It needs no torch (``from trainguard import Monitor`` works where torch is not installed); torch
tensors are accepted too, and handled with torch's own ops. The findings, actions, messages and
remedies are the torch Guard's: the same detectors and policy (:class:`~trainguard.core.DecisionCore`).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .core import CoreView, calm_limit, check_int
from .detect import Detector
from .policy import Policy
from .sinks.base import Sink
from .types import Action, Finding, StepStats

#: see trainguard.measure.HUGE_WEIGHT (the same number: a parameter norm above it is corruption)
HUGE_WEIGHT = 1e15


@dataclass
class Decision:
    """What to do with this step's update."""
    apply: bool  #: carry out this update
    lr_scale: float  #: the cumulative LR multiplier (multiply your LR by it)
    clip_scale: float  #: <= 1: multiply the gradients by it
    rolled_back: bool  #: the parameters were just restored in place
    findings: list[Finding] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _norm(x: Any) -> float:
    """The 2-norm in float64 (torch tensors with torch, the rest with NumPy)."""
    if _is_torch(x):
        import torch
        with torch.no_grad():
            return float(torch.linalg.vector_norm(x.detach().double()))
    a = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.linalg.norm(a.astype(np.float64, copy=False).ravel()))


def _copy(x: Any) -> Any:
    return x.detach().clone() if _is_torch(x) else np.array(x, copy=True)


def _restore(dst: Any, src: Any) -> None:
    if _is_torch(dst):
        import torch
        with torch.no_grad():
            dst.copy_(src)
    else:
        np.copyto(dst, src)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


class Monitor(CoreView):
    """Guard a loop that applies its own updates (see the module docstring).

    Args:
        params: name -> array (NumPy ``ndarray`` or torch tensor), held by reference: a rollback
            restores them in place. Update them in place (``w -= ...``); if your loop rebinds
            (``w = w - ...``), pass the new arrays with ``mon.step(..., params={...})``.
        policy, detectors, sinks, keep_records: as for :class:`trainguard.Guard`.
        clip: ``"adaptive"`` (default), a number (fixed global norm), ``None``.
        snapshot_every, snapshots: rollback snapshots (copies of the parameters, verified
            finite) every this many steps, this many kept.
        chance_loss: the loss of an uninformed guess (ln V for a V-class cross-entropy) for the
            divergence detector's "above chance" rule, or None.
        console, log: print interventions (rich when installed) / a JSONL event log.
        judge_loss: as for :class:`trainguard.Guard` (``"auto"``: the loss-progress rules go
            off once this Monitor's steps and another guarded run's take turns, a GAN's).
    """

    def __init__(self, params: Mapping[str, Any], *, policy: Policy | None = None,
                 clip: Any = "adaptive", detectors: Sequence[Detector] | None = None,
                 snapshot_every: int = 100, snapshots: int = 2, chance_loss: float | None = None,
                 console: bool = False, log: str | None = None, sinks: Iterable[Sink] = (),
                 keep_records: int = 10_000, judge_loss: bool | str = "auto") -> None:
        self._shapes = self._check_params(params)
        self.params = dict(params)
        self._init_core(policy=policy, detectors=detectors, clip=clip, console=console, log=log,
                        sinks=sinks, keep_records=keep_records, chance_loss=chance_loss,
                        who="Monitor", judge_loss=judge_loss)
        self.snapshot_every = check_int("snapshot_every", snapshot_every)
        self.keep = check_int("snapshots", snapshots)
        self._snaps: list[tuple[int, dict[str, Any]]] = []
        self._unchanged = 0
        self._last_norms: list[float] | None = None
        self._warned = False

    def close(self) -> None:
        self.core.close(self.summary())

    def state_dict(self) -> dict[str, Any]:
        return {**self.core.state_dict(), "lr": self.lr.state_dict(),
                "clip": self.clipper.state_dict() if self.clipper is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)
        self.lr.load_state_dict(state["lr"])
        if self.clipper is not None and state.get("clip") is not None:
            self.clipper.load_state_dict(state["clip"])
        self.core.event("run_resumed", step=self.core.step_count)  # the log's run continues

    # -- validation -------------------------------------------------------------------------------
    @staticmethod
    def _check_params(params: Any) -> dict[str, tuple[int, ...]]:
        if not isinstance(params, Mapping) or not params:
            raise TypeError("Monitor(params=...) expects a non-empty dict name -> array (NumPy "
                            f"ndarray or torch tensor), got {type(params).__name__}")
        shapes = {}
        for k, v in params.items():
            if _is_torch(v):
                if not v.is_floating_point():
                    raise TypeError(f"params[{k!r}] must be a floating-point tensor, got {v.dtype}")
            elif not isinstance(v, np.ndarray) or v.dtype.kind != "f":
                raise TypeError(f"params[{k!r}] must be a floating-point NumPy array (held by "
                                f"reference and restored in place), got "
                                f"{type(v).__name__}{'' if not isinstance(v, np.ndarray) else ' of ' + str(v.dtype)}")
            shapes[str(k)] = _shape(v)
        return shapes

    def _check_step(self, loss: Any, grads: Any, params: Any) -> float:
        if params is not None:
            shapes = self._check_params(params)
            if set(shapes) != set(self._shapes):
                raise ValueError(f"params has keys {sorted(shapes)}, expected {sorted(self._shapes)}")
            self.params = dict(params)
        for k, v in self.params.items():
            if _shape(v) != self._shapes[k]:
                raise ValueError(f"params[{k!r}] changed shape from {self._shapes[k]} to "
                                 f"{_shape(v)}: a parameter's shape must stay the same")
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a dict name -> array like params, got {type(grads).__name__}")
        missing = sorted(set(self._shapes) - set(grads))
        extra = sorted(set(grads) - set(self._shapes))
        if missing or extra:
            raise ValueError(f"grads must have the keys of params {sorted(self._shapes)}; "
                             f"missing {missing}, unexpected {extra}")
        for k, g in grads.items():
            if _shape(g) != self._shapes[k]:
                raise ValueError(f"grads[{k!r}] has shape {_shape(g)}, expected "
                                 f"{self._shapes[k]} like params[{k!r}] (a gradient must have its "
                                 "parameter's shape: sum over the batch axis)")
        try:
            if _is_torch(loss):
                if loss.numel() != 1:
                    raise ValueError
                return float(loss.detach())
            a = np.asarray(loss, dtype=np.float64)
            if a.size != 1:
                raise ValueError
            return float(a.reshape(()))
        except (TypeError, ValueError):
            raise TypeError(f"loss must be a scalar (float, NumPy scalar or 1-element array or "
                            f"tensor), got {type(loss).__name__}"
                            f"{' of shape ' + str(_shape(loss)) if hasattr(loss, 'shape') else ''}") from None

    # -- the step -------------------------------------------------------------------------------
    def step(self, loss: Any, grads: Mapping[str, Any], lr: float | None = None, *,
             params: Mapping[str, Any] | None = None, sample_ids: Any = None,
             sample_losses: Any = None) -> Decision:
        """Judge this step's update before the loop applies it. Raises
        :class:`~trainguard.TrainingUnstable` when repairs are exhausted. ``sample_ids`` /
        ``sample_losses``: the batch's row ids and per-row losses, read only on a bad step
        (see :mod:`trainguard.samples`; ``monitor.bad_batches``)."""
        lv = self._check_step(loss, grads, params)
        core = self.core
        core.take_turn()
        t = core.step_count
        if sample_ids is not None or sample_losses is not None:
            core.offer_samples(t, sample_ids, sample_losses)
        names = list(self._shapes)
        pn = [_norm(self.params[k]) for k in names]
        self._watch_rebinding(pn)
        quiet = t - core.last_severe > 10
        if (not self._snaps and core.rollbacks == 0) or (t % self.snapshot_every == 0 and quiet):
            self._snapshot(t, pn)
        gn = [_norm(grads[k]) for k in names]
        with np.errstate(over="ignore", invalid="ignore"):
            gtot = float(np.sqrt(np.sum(np.square(gn))))
            ptot = float(np.sqrt(np.sum(np.square(pn))))
        stats = StepStats(step=t, loss=lv, grad_norm=gtot, modules=names, grad_norms=gn,
                          param_norms=pn, param_norm=ptot,
                          lr=None if lr is None else float(lr) * self.lr.scale)
        if all(math.isfinite(v) for v in pn) and ptot > HUGE_WEIGHT:
            stats.huge_param_modules = [k for k, v in zip(names, pn) if v > HUGE_WEIGHT]
        core.history.append(stats)
        n_actions = len(core.actions)
        findings, plan, severe = core.run(stats)
        apply, rolled, clip_scale = True, False, 1.0
        by = dict(plan.actions)
        if "halt" in by:
            f = by["halt"]
            raise core.halt(f"{f.kind} is configured to halt the run (policy.halt_on)", f,
                            self.lr.scale, t)
        if "rollback" in by:
            self._rollback(by["rollback"], t)
            apply, rolled = False, True
        if "lr_backoff" in by:
            core.backoff_lr(by["lr_backoff"], self.lr, t)
        if apply and "skip" in by:
            f = by["skip"]
            core.act("skip", f"{f.kind}: update not applied", step=t, finding=f.kind)
            apply = False
        if apply and math.isfinite(gtot):
            clip_scale = core.clip_scale(self.clipper, by.get("clip"), gtot, t)
        self.lr.tick(troubled=severe)
        if apply:
            core.applied_steps += 1
        if core.sinks:
            core.stats(stats)
        core.step_count += 1
        return Decision(apply=apply, lr_scale=self.lr.scale, clip_scale=clip_scale,
                        rolled_back=rolled, findings=findings,
                        actions=list(core.actions[n_actions:]))

    def _snapshot(self, t: int, pn: list[float]) -> None:
        if not all(math.isfinite(v) and v < HUGE_WEIGHT for v in pn):
            return  # never keep corrupted parameters as a rollback target
        self._snaps.append((t, {k: _copy(v) for k, v in self.params.items()}))
        del self._snaps[:-self.keep]

    def _rollback(self, f: Finding, t: int) -> None:
        core = self.core
        limit = calm_limit(f, t)
        older = [s for s in self._snaps if s[0] <= limit] or self._snaps[:1]
        core.check_rollback(f, bool(older), self.lr.scale, t)
        step, saved = older[-1]
        for k, v in saved.items():
            _restore(self.params[k], v)
        self._snaps = [s for s in self._snaps if s[0] <= step]
        core.rolled_back(f, t, step, f"restored the parameters of step {step} in place")

    def _watch_rebinding(self, pn: list[float]) -> None:
        """A loop that rebinds (``w = w - lr * g``) leaves the Monitor's arrays untouched:
        rollbacks would restore arrays the loop no longer uses. Warn once."""
        last = self._last_norms
        self._last_norms = pn
        applied = self.core.applied_steps
        if last is not None and applied and pn == last:
            self._unchanged += 1
        else:
            self._unchanged = 0
        if self._unchanged >= 3 and not self._warned:
            self._warned = True
            warnings.warn("trainguard.Monitor: the parameters have not changed for 3 applied "
                          "updates: update the arrays in place (w -= lr * g), or pass the new "
                          "ones each step with mon.step(..., params={...}); otherwise a rollback "
                          "restores arrays your loop no longer uses", RuntimeWarning,
                          stacklevel=3)
