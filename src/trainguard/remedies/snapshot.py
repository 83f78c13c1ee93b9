"""In-memory snapshots for rollback: model parameters and buffers, optimizer state, GradScaler
state and RNG states, copied tensor by tensor (no pickling, no state_dict collectives, so the
same code serves plain, DDP and FSDP2 models: each rank copies its own shard).

Cadence and memory: a snapshot is taken every ``every`` steps (default 100) when the last
``quiet`` steps had no severe finding; ``keep`` (default 2) are held, on ``device`` ("cpu" by
default). Memory per snapshot = parameters + buffers + optimizer state (Adam: about 3x the
parameter bytes). Buffers are reused between snapshots, so steady-state cost is one copy.

On CUDA with ``device="cpu"`` the host copies live in pinned memory and are made with
``non_blocking=True``: the copy overlaps the next steps (it is ordered on the stream before
them, so it reads the weights of the step it is labelled with); a CUDA event recorded after
the copies is waited on only when the snapshot is restored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..stats import _local


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@dataclass
class Snapshot:
    step: int
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    optim: list[dict[str, Any]]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    restores: int = 0
    event: Any = None  # CUDA event after an asynchronous device-to-host copy

    def wait(self) -> None:
        """Block until the asynchronous copies of this snapshot have landed."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.params + self.buffers)
        for st in self.optim:
            n += sum(t.numel() * t.element_size() for v in st.values() for t in _tensors(v))
        return n


def _copy_into(dst: torch.Tensor | None, src: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    src = _local(src.detach())
    if dst is not None and dst.shape == src.shape and dst.dtype == src.dtype:
        dst.copy_(src, non_blocking=dst.is_pinned())
        return dst
    if src.is_cuda and torch.device(device).type == "cpu":
        out = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        out.copy_(src, non_blocking=True)
        return out
    return src.to(device, copy=True)


def _copy_nested(v: Any, device: str | torch.device) -> Any:
    """An optimizer-state value that is not a tensor, copied so that it is never shared
    between the snapshot and the live state: lists and tuples (and dicts) of tensors, such as
    LBFGS's histories, which the optimizer appends to and pops from in place, are rebuilt
    around copies of their tensors; numbers and other values are kept as they are."""
    if isinstance(v, torch.Tensor):
        return _copy_into(None, v, device)
    if type(v) in (list, tuple):
        return type(v)(_copy_nested(x, device) for x in v)
    if type(v) is dict:
        return {k: _copy_nested(x, device) for k, x in v.items()}
    return v


def _tensors(v: Any) -> list[torch.Tensor]:
    """The tensors in an optimizer-state value (itself, or inside lists, tuples and dicts)."""
    if isinstance(v, torch.Tensor):
        return [v]
    if type(v) in (list, tuple):
        return [t for x in v for t in _tensors(x)]
    if type(v) is dict:
        return [t for x in v.values() for t in _tensors(x)]
    return []


def _copy_all(dsts: list[torch.Tensor | None], srcs: list[torch.Tensor],
              device: str | torch.device) -> list[torch.Tensor]:
    """Copies of ``srcs``: into the tensor of ``dsts`` at the same place when it has the same
    shape and dtype and is on the same side of the host/CUDA line (the steady state: all of
    those in one fused ``torch._foreach_copy_``, which copies across devices as ``copy_``
    does, instead of a Python call per tensor), else as :func:`_copy_into` makes them: a
    pinned host copy of a CUDA tensor, asynchronous."""
    out: list[torch.Tensor] = []
    into: list[torch.Tensor] = []
    fused: list[torch.Tensor] = []
    for d, s in zip(dsts, srcs):
        s = _local(s)
        if d is not None and d.is_cuda is s.is_cuda and d.shape == s.shape and d.dtype == s.dtype:
            into.append(d)
            fused.append(s)
            out.append(d)
        else:
            out.append(_copy_into(d, s, device))
    if into:
        torch._foreach_copy_(into, fused)
    return out


class SnapshotStore:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                 scaler: Any = None, *, every: int = 100, keep: int = 2, device: str = "cpu") -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"snapshot_every must be a positive integer, got {every!r}")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"snapshots (how many to keep) must be a positive integer, got {keep!r}")
        self.model, self.optimizer, self.params, self.scaler = model, optimizer, params, scaler
        self.every, self.keep, self.device = every, keep, device
        self.snaps: list[Snapshot] = []
        # the step of the snapshot last restored and the step it was restored at (numbers, not
        # the snapshot: holding it would keep a dropped snapshot's tensors alive)
        self.restored_step = -1
        self.restored_at = -1

    @torch.no_grad()
    def take(self, step: int, extra: dict[str, Any] | None = None) -> Snapshot:
        # the oldest snapshot's tensors are refilled once ``keep`` are held
        reuse = self.snaps.pop(0) if len(self.snaps) >= self.keep else None
        bufs = list(self.model.buffers())
        # every tensor of the state in one list (parameters, buffers, then each parameter's
        # optimizer-state tensors), with the reused snapshot's tensor of the same place
        srcs: list[torch.Tensor] = [*self.params, *bufs]
        dsts: list[torch.Tensor | None] = [
            *(reuse.params[i] if reuse and i < len(reuse.params) else None
              for i in range(len(self.params))),
            *(reuse.buffers[i] if reuse and i < len(reuse.buffers) else None
              for i in range(len(bufs)))]
        states = [self.optimizer.state.get(p, {}) for p in self.params]
        for i, st in enumerate(states):
            old = reuse.optim[i] if reuse and i < len(reuse.optim) else {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    srcs.append(v)
                    o = old.get(k)
                    dsts.append(o if isinstance(o, torch.Tensor) else None)
        copies = _copy_all(dsts, srcs, self.device)
        n = len(self.params) + len(bufs)
        params, buffers, rest = copies[:len(self.params)], copies[len(self.params):n], iter(copies[n:])
        optim = [{k: (next(rest) if isinstance(v, torch.Tensor) else _copy_nested(v, self.device))
                  for k, v in st.items()} for st in states]
        event = None
        if any(t.is_pinned() for t in params[:1] + buffers[:1]):
            event = torch.cuda.Event()
            event.record()
        snap = Snapshot(step=step, params=params, buffers=buffers, optim=optim,
                        scaler=self.scaler.state_dict() if self.scaler is not None else None,
                        rng=_rng_state(), extra=dict(extra or {}), event=event)
        self.snaps.append(snap)
        return snap

    @torch.no_grad()
    def verify(self, huge: float, huge_state: float) -> bool:
        """Every parameter finite and below ``huge`` in magnitude, every optimizer-state tensor
        finite and below ``huge_state``, every float buffer finite: a snapshot of anything else
        would be restored by a rollback as if it were good (one read of the state, at snapshot
        cadence only)."""
        params = [_local(p) for p in self.params]
        bufs = [_local(b) for b in self.model.buffers() if b.is_floating_point()]
        state = [_local(v) for p in self.params for v in self.optimizer.state.get(p, {}).values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0]
        for group, limit in ((params, huge), (state, huge_state), (bufs, math.inf)):
            group = [t for t in group if t.numel()]  # a shard can be empty (FSDP)
            if not group:
                continue
            # the L2 norm first: 8x faster than the max-norm on CPU (1.0 s -> 0.15 s for a
            # 100M-parameter model's weights and Adam state), finite iff every value is, and
            # max|x| <= L2; only a norm at or over the limit (or overflowed) needs the exact check.
            # The norms of mixed dtypes are stacked in the widest (stack promotes), then fp32.
            l2 = torch.stack(torch._foreach_norm(group, 2)).float()
            if bool(torch.isfinite(l2).all()) and float(l2.max()) < limit:
                continue
            m = torch.stack([t.float() for t in torch._foreach_norm(group, math.inf)])
            if not bool(torch.isfinite(m).all()) or float(m.max()) >= limit:
                return False
        return True

    def pick(self, before_step: int) -> Snapshot | None:
        """The newest snapshot taken at or before ``before_step`` (else the oldest held)."""
        if not self.snaps:
            return None
        older = [s for s in self.snaps if s.step <= before_step]
        return older[-1] if older else self.snaps[0]

    def choose(self, before_step: int, healthy: Any = None) -> Snapshot | None:
        """The snapshot a rollback at ``before_step + 1`` restores: the newest taken at or before
        ``before_step``, or before ``healthy`` (the last step a detector saw healthy, e.g. before
        units were killed). A snapshot restored since that healthy step holds the damage too:
        it is dropped and the one before it chosen."""
        before = before_step
        if isinstance(healthy, int) and 0 <= healthy < before:
            before = healthy
        snap = self.pick(before_step=before)
        if (isinstance(healthy, int) and snap is not None and snap.step == self.restored_step
                and healthy < self.restored_at):
            self.drop(snap)
            snap = self.pick(before_step=before)
        return snap

    @torch.no_grad()
    def restore(self, snap: Snapshot, at_step: int = -1) -> None:
        """Restore ``snap`` into the model, optimizer, scaler and RNGs (at step ``at_step``)."""
        self.restored_step, self.restored_at = snap.step, at_step
        snap.wait()
        for p, saved in zip(self.params, snap.params):
            _local(p.data).copy_(saved)
        for b, saved in zip(self.model.buffers(), snap.buffers):
            _local(b).copy_(saved)
        for p, saved_state in zip(self.params, snap.optim):
            cur = self.optimizer.state.get(p)
            new: dict[str, Any] = {}
            for k, v in saved_state.items():
                if isinstance(v, torch.Tensor):
                    tgt = cur.get(k) if cur else None
                    if (isinstance(tgt, torch.Tensor) and _local(tgt).shape == v.shape
                            and tgt.dtype == v.dtype):
                        _local(tgt).copy_(v)
                        new[k] = tgt
                    else:
                        dev = v.device if k == "step" and v.device.type == "cpu" else _local(p).device
                        new[k] = v.to(dev, copy=True)
                else:
                    new[k] = _copy_nested(v, _local(p).device)  # the snapshot's own stays intact
            if new:
                self.optimizer.state[p] = new
            elif p in self.optimizer.state:
                del self.optimizer.state[p]
        if self.scaler is not None and snap.scaler is not None:
            self.scaler.load_state_dict(snap.scaler)
        _set_rng_state(snap.rng)
        snap.restores += 1
        # everything newer than the restored snapshot describes the abandoned trajectory
        self.snaps = [s for s in self.snaps if s.step <= snap.step]

    def restore_checkpoint(self, path: str, step: int, at_step: int = -1) -> None:
        """A rollback to a checkpoint on disk (read with ``weights_only=True``; a file that is
        unreadable or holds non-finite values raises ValueError before anything changes)."""
        from .checkpoint import load_checkpoint
        load_checkpoint(path, self.model, self.optimizer, self.scaler)
        self.restored_step, self.restored_at = step, at_step
        self.snaps = [s for s in self.snaps if s.step <= step]

    def clear(self) -> None:
        """Forget every snapshot (a structural repair: they hold the old structure's weights)."""
        self.snaps = []

    def drop(self, snap: Snapshot) -> None:
        if snap in self.snaps and len(self.snaps) > 1:
            self.snaps.remove(snap)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.snaps)
