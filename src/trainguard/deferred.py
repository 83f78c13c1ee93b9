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

from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from .core import DecisionCore
from .measure import StepProbe
from .remedies.clip import AGC
from .remedies.executor import Executor
from .stats import _local

#: statistics vectors in flight before the host waits for the oldest (CUDA); a decision
#: (rollback, LR backoff, halt) comes at most this many steps after the step it is about
MAX_IN_FLIGHT = 4


class _Backup:
    """Preallocated copies of parameters and optimizer state for the device-side select."""

    def __init__(self) -> None:
        #: one buffer per place in :meth:`targets`' order (parameters, then each parameter's
        #: state tensors). Keyed by ``id(p.data)`` before, a new object every step: the
        #: buffers piled up, a parameter-sized one at most steps (a leak over a long run)
        self.bufs: list[torch.Tensor] = []

    def targets(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        ts: list[torch.Tensor] = []
        for p in params:
            ts.append(_local(p.data))
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    ts.append(_local(v))
        return ts

    @torch.no_grad()
    def save(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        targets = self.targets(params, optimizer)
        bufs = self.bufs
        del bufs[len(targets):]  # state that went away
        pairs = []
        by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i, t in enumerate(targets):
            b = bufs[i] if i < len(bufs) else None
            if b is None or b.shape != t.shape or b.dtype != t.dtype or b.device != t.device:
                b = torch.empty_like(t)
                if i < len(bufs):
                    bufs[i] = b
                else:
                    bufs.append(b)
            dst, src = by_device.setdefault(t.device, ([], []))
            dst.append(b)
            src.append(t)
            pairs.append((t, b))
        for dst, src in by_device.values():  # one fused copy per device
            torch._foreach_copy_(dst, src)
        self.had_state = {id(p) for p in params if optimizer.state.get(p)}
        return pairs

    @torch.no_grad()
    def select(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               pairs: list[tuple[torch.Tensor, torch.Tensor]],
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
        for p in params:
            if id(p) in self.had_state:
                continue
            for k, v in optimizer.state.get(p, {}).items():
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


class DeferredStepper:
    """``sync=False`` on the same pieces as the default mode: the step probe measures (into a
    device vector), the executor steps and, once the host reads the vector, carries out the
    late part of the core's plan (rollback, LR backoff, halt), dated with the step it is about."""

    def __init__(self, core: DecisionCore, measure: StepProbe, executor: Executor, *,
                 infer_chance: Callable[[float], float | None],
                 release: Callable[[], None]) -> None:
        self.core, self.measure, self.executor = core, measure, executor
        self.infer_chance = infer_chance
        self.release = release  # drop locate's references (no replay in this mode)
        self.pending: deque[tuple] = deque()
        self.backup: _Backup | None = None

    def step(self, loss: Any, step: int) -> bool:
        """Measure, skip on the device when non-finite, clip, step; decide later."""
        pending = self.pending
        while pending and (_ready(pending[0]) or len(pending) >= MAX_IN_FLIGHT):
            self.drain_one()
        ex, measure = self.executor, self.measure
        scaled = ex.scaler_ready()
        vec, idx, n_norms, meta = measure.device_vector(loss, step, scaled)
        known = meta[-1]
        params = measure.probe.params
        grads = [p.grad for p in params if p.grad is not None]
        with torch.no_grad():
            # only the norms and the loss decide (sampled activation stats use NaN as "n/a")
            ok = torch.isfinite(vec[:n_norms]).all()
            if known:  # an unknown loss (NaN placeholder) decides nothing
                ok = ok & torch.isfinite(vec[-1])
            clipper = ex.clipper
            if clipper is not None and not isinstance(clipper, AGC) and grads:
                thr = clipper.threshold()
                if thr != float("inf"):
                    total = vec[:len(idx)].square().sum().sqrt()
                    coef = torch.clamp(thr / (total + 1e-6), max=1.0)
                    coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
                    torch._foreach_mul_(grads, coef.to(grads[0].device))
            elif isinstance(clipper, AGC):
                clipper.apply(params)
        opt = ex.optimizer
        late: list = []
        if not scaled and getattr(opt, "_step_supports_amp_scaling", False):
            # fused optimizers skip inside their kernel, step counters included (the
            # GradScaler protocol): an exact device-side skip without any backup copy
            setattr(opt, "grad_scale", None)
            setattr(opt, "found_inf", (~ok).float().to(measure.probe.device))
            try:
                ex.optimizer_step(False)
            finally:
                delattr(opt, "grad_scale")
                delattr(opt, "found_inf")
            self.backup = None
        else:
            backup = self.backup or _Backup()
            self.backup = backup
            pairs = backup.save(params, opt) if not scaled else []
            ex.optimizer_step(scaled)
            late = backup.select(params, opt, pairs, ok) if not scaled else []
        if vec.device.type == "cuda":
            host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event: Any = torch.cuda.Event()
            event.record()
        else:
            host, event = vec, None
        pending.append((step, host, event, meta, late))
        self.release()
        if ex.scheduler is not None:
            ex.scheduler.step()
        return True

    def drain_one(self) -> None:
        """Read the oldest pending step's statistics on the host and act on them."""
        step, host, event, meta, late = self.pending.popleft()
        if event is not None:
            event.synchronize()
        h = host.numpy().astype(np.float64) if host.device.type == "cpu" else host.cpu().numpy()
        ex, core = self.executor, self.core
        stats = self.measure.host_stats(step, h, meta, ex.current_lr())
        ok = bool(stats.loss_finite and stats.grads_finite and stats.params_finite)
        core.history.append(stats)
        findings, plan, severe = core.run(stats, infer_chance=self.infer_chance)
        if not ok and not stats.scaler_overflow:
            undo_late(late)
            running = self.measure.running
            if running:
                # the skipped batch's forward wrote its statistics (NaN) into BatchNorm's
                # running buffers: back to the last verified copy (the few batches since, in
                # flight, lose their momentum update: training mode never reads these buffers)
                running.restore()
            core.act("skip", "non-finite values: update discarded on the device (parameters, "
                             "optimizer moments and step counters untouched"
                     + ("; normalisation running statistics restored" if running else "") + ")",
                     step=step, finding="nonfinite")
        clipper = ex.clipper
        if clipper is not None and not isinstance(clipper, AGC) and ok:
            thr = clipper.threshold()
            clipper.coefficient(stats.grad_norm)  # update the statistics
            if stats.grad_norm > thr:
                core.act("clip", f"{clipper.name} clipping (on device): gradient norm "
                                 f"{stats.grad_norm:.4g} -> {thr:.4g}", step=step,
                         norm=stats.grad_norm, threshold=thr)
        plan.actions = [(a, f) for a, f in plan.actions if a in ("halt", "rollback", "lr_backoff")]
        if plan:
            ex.late(plan, step, scaled=False)
        ex.lr.tick(troubled=severe)
        rolled = "rollback" in plan.kinds()
        if rolled:
            self.pending.clear()  # the steps still in flight belong to the abandoned trajectory
        applied = ok and not rolled
        ex.after_step(stats, applied, severe, step)

    def drain(self) -> None:
        """Read every step whose statistics are still in flight."""
        while self.pending:
            self.drain_one()
