"""``Guard(sync=False)``: no host synchronisation on the step path.

Step t, all on the device:
  1. the probe's statistics vector (norms, loss, sampled activation stats) is built;
  2. ``ok = all(isfinite(vector))`` (a device bool);
  3. adaptive/fixed clipping multiplies the gradients by ``min(1, threshold / norm)`` where the
     threshold comes from the host statistics one step old (``clip_grad_norm_``'s sync-free
     trick);
  4. parameters and optimizer state are copied into preallocated buffers, the optimizer
     steps, and every tensor is restored with ``torch.where(ok, new, old)``: a true skip
     (moments and step counters included) decided on the device. Tensors that live on
     another device than the statistics (Adam's CPU step counters next to CUDA weights) are
     restored when the host reads the flag, before the next update;
  5. the vector is copied to the host without blocking (pinned memory + CUDA event).
At the start of a later step the host reads every pending vector whose copy has completed
(``event.query()``, never a wait), runs the detectors and the policy, and applies what can
still be applied: rollback, LR backoff and halt. On CPU that is the next step; on CUDA, where
the host may run ahead of the device, the decision comes up to ``MAX_IN_FLIGHT`` steps late
(then the host waits for the oldest one: the only wait, bounded). A loss spike is therefore
seen late and cannot be skipped; non-finite values always are, on the device.

Cost: optimizers that implement GradScaler's in-kernel skip (``_step_supports_amp_scaling``:
``fused=True`` Adam, AdamW, SGD, on CPU and CUDA) receive the flag as ``found_inf`` and skip
exactly with no copy. Any other optimizer pays a backup of parameters and optimizer state
every step (memory traffic of about one extra optimizer step), the price of an exact skip
without a sync.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .remedies.clip import AGC
from .stats import _local, build_stats

if TYPE_CHECKING:  # pragma: no cover
    from .guard import Guard

#: statistics vectors in flight before the host waits for the oldest (CUDA); a decision
#: (rollback, LR backoff, halt) comes at most this many steps after the step it is about
MAX_IN_FLIGHT = 4


class _Backup:
    """Preallocated copies of parameters and optimizer state for the device-side select."""

    def __init__(self) -> None:
        self.bufs: dict[int, torch.Tensor] = {}

    def targets(self, guard: "Guard") -> list[torch.Tensor]:
        ts: list[torch.Tensor] = []
        for p in guard.probe.params:
            ts.append(_local(p.data))
            for v in guard.optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    ts.append(_local(v))
        return ts

    @torch.no_grad()
    def save(self, guard: "Guard") -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for t in self.targets(guard):
            b = self.bufs.get(id(t))
            if b is None or b.shape != t.shape or b.dtype != t.dtype or b.device != t.device:
                b = torch.empty_like(t)
                self.bufs[id(t)] = b
            b.copy_(t)
            pairs.append((t, b))
        self.had_state = {id(p) for p in guard.probe.params if guard.optimizer.state.get(p)}
        return pairs

    @torch.no_grad()
    def select(self, guard: "Guard", pairs: list[tuple[torch.Tensor, torch.Tensor]],
               ok: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keep the update where ``ok`` (a device bool), else restore the saved values. Tensors
        on another device than ``ok`` (Adam's CPU step counters beside CUDA weights) cannot be
        selected without a sync: their increment is returned, to be subtracted once the host
        reads the flag (exact for counters even if later steps have advanced them)."""
        late: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t, b in pairs:
            if t.device == ok.device:
                t.copy_(torch.where(ok, t, b))
            else:
                late.append((t, t - b))
        # state created by this step (first update): reset it to its initial zeros on a skip
        for p in guard.probe.params:
            if id(p) in self.had_state:
                continue
            for k, v in guard.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    lv = _local(v)
                    if lv.device == ok.device:
                        lv.copy_(torch.where(ok, lv, torch.zeros_like(lv)))
                    else:
                        late.append((lv, lv.clone()))
        return late


@torch.no_grad()
def undo_late(late: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for t, delta in late:
        t.sub_(delta)


def _ready(entry: tuple) -> bool:
    event = entry[2]
    return event is None or event.query()


def deferred_step(guard: "Guard", loss: Any) -> bool:
    pending = guard._pending
    while pending and (_ready(pending[0]) or len(pending) >= MAX_IN_FLIGHT):
        drain(guard)
    if not guard.snapshots.snaps and guard.rollbacks == 0:
        guard.snapshots.take(guard.step_count)
    scaled = guard._scaler_ready()
    extra, names, kinds = guard._extra_tensors(scaled)
    with_params = guard.step_count % guard.param_norm_every == 0
    known = loss is not None
    vec, idx, n_norms = guard.probe.measure_device(loss if known else math.nan,
                                                   with_params=with_params, extra=extra)
    grads = [p.grad for p in guard.probe.params if p.grad is not None]
    with torch.no_grad():
        # only the norms and the loss decide (sampled activation stats use NaN as "n/a")
        ok = torch.isfinite(vec[:n_norms]).all()
        if known:  # an unknown loss (NaN placeholder) decides nothing
            ok = ok & torch.isfinite(vec[-1])
        clipper = guard.clipper
        if clipper is not None and not isinstance(clipper, AGC) and grads:
            thr = clipper.threshold()
            if thr != float("inf"):
                total = vec[:len(idx)].square().sum().sqrt()
                coef = torch.clamp(thr / (total + 1e-6), max=1.0)
                coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        elif isinstance(clipper, AGC):
            clipper.apply(guard.probe.params)
    opt = guard.optimizer
    if not scaled and getattr(opt, "_step_supports_amp_scaling", False):
        # fused optimizers skip inside their kernel, step counters included (the GradScaler
        # protocol): an exact device-side skip without any backup copy
        setattr(opt, "grad_scale", None)
        setattr(opt, "found_inf", (~ok).float().to(guard.probe.device))
        try:
            guard._optimizer_step(False)
        finally:
            delattr(opt, "grad_scale")
            delattr(opt, "found_inf")
        guard._backup = None
        late: list = []
    else:
        backup = getattr(guard, "_backup", None) or _Backup()
        guard._backup = backup
        pairs = backup.save(guard) if not scaled else []
        guard._optimizer_step(scaled)
        late = backup.select(guard, pairs, ok) if not scaled else []
    if vec.device.type == "cuda":
        host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
        host.copy_(vec, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host, event = vec, None
    pending.append((guard.step_count, host, event, idx, with_params, names, kinds, scaled, late,
                    known))
    if guard._capture is not None:
        guard._capture.release()  # no replay in this mode: keep no references across steps
    if guard.scheduler is not None:
        guard.scheduler.step()
    return True


def drain(guard: "Guard") -> None:
    """Read the oldest pending step's statistics on the host and act on them."""
    step, host, event, idx, with_params, names, kinds, scaled, late, known = guard._pending.popleft()
    if event is not None:
        event.synchronize()
    h = host.numpy().astype("float64") if host.device.type == "cpu" else host.cpu().numpy()
    gn, idx, pn, ev, lv = guard.probe.split(h, idx, with_params)
    scale, acts = guard._unpack_extra(ev, names, kinds)
    if acts:
        acts.pop("__found_inf__", None)
        acts = acts or None
    stats = build_stats(step, guard.probe, gn, idx, pn, float(lv[0]), lr=guard._current_lr(),
                        loss_scale=scale, activations=acts, optimizer=guard._opt_kind)
    stats.loss_known = known
    ok = bool(stats.loss_finite and stats.grads_finite and stats.params_finite)
    if scaled and not stats.grads_finite and stats.loss_finite and stats.params_finite:
        stats.scaler_overflow = True
    guard.history.append(stats)
    saved_count = guard.step_count
    guard.step_count = step  # findings and actions carry the step they are about
    try:
        findings = guard._detect(stats)
        if stats.scaler_overflow and not any(f.kind == "nonfinite" for f in findings):
            guard._event("scaler_overflow", loss_scale=stats.loss_scale)
        for f in findings:
            guard._emit_finding(f)
        if not ok and not stats.scaler_overflow:
            undo_late(late)
            guard._act("skip", "non-finite values: update discarded on the device (parameters, "
                               "optimizer moments and step counters untouched)", finding="nonfinite")
        if guard.clipper is not None and not isinstance(guard.clipper, AGC) and ok:
            thr = guard.clipper.threshold()
            guard.clipper.coefficient(stats.grad_norm)  # update the statistics
            if stats.grad_norm > thr:
                guard._act("clip", f"{guard.clipper.name} clipping (on device): gradient norm "
                                   f"{stats.grad_norm:.4g} -> {thr:.4g}", norm=stats.grad_norm,
                           threshold=thr)
        plan = guard.policy.decide(findings, step)
        late_plan = [(a, f) for a, f in plan.actions if a in ("halt", "rollback", "lr_backoff")]
        plan.actions = late_plan
        severe = any(f.severe for f in findings)
        if severe:
            guard._last_severe = step
        if plan:
            guard._late_remedies(plan, scaled=False)
        guard.lr.tick(troubled=severe)
        rolled = any(a == "rollback" for a, _ in late_plan)
        if rolled:
            # the steps still in flight belong to the abandoned trajectory
            guard._pending.clear()
        applied = ok and not rolled
        guard.last_step_applied = applied
        guard._after_step(stats, applied, severe)
    finally:
        guard.step_count = saved_count
