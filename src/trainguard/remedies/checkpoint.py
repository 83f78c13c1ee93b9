"""Checkpoints on disk that are never poisoned, and the rollback that reaches back to them.

``tg.Guard(..., checkpoint_dir="ckpt", checkpoint_every=1000)`` writes
``ckpt/trainguard-step000001000.pt`` every 1000 steps **only while the run is healthy**
(``guard.healthy``: weights, optimizer state and buffers checked finite and not huge, no severe
finding left unanswered); an unhealthy save is deferred to the next healthy step, so a NaN run
never rotates the last good checkpoint away. The newest ``checkpoints`` (default 2) are kept; an
older one is removed only after a newer one is durably on disk.

A file holds ``torch.save`` of plain state dicts (model, optimizer, GradScaler, the CPU RNG state)
and the Guard's own state as JSON text; it is written to a temporary file, fsync'ed, renamed and
the folder fsync'ed. It is read with ``torch.load(weights_only=True)``: nothing is unpickled, and
a file that fails the same finite check is never loaded into the model.

A rollback the in-memory snapshots cannot serve (none held, or every one is newer than the last
step a detector saw healthy, e.g. before units died) restores the newest checkpoint at or before
that step.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import torch
from torch import nn

from .._fsio import atomic_write

FORMAT = "trainguard-checkpoint"
_NAME = re.compile(r"^trainguard-step(\d{9,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"trainguard-step{step:09d}.pt"


def _finite_state(sd: Any) -> bool:
    """Every floating tensor in a (nested) state dict is finite."""
    if isinstance(sd, torch.Tensor):
        return not sd.is_floating_point() or bool(torch.isfinite(sd).all())
    if isinstance(sd, dict):
        return all(_finite_state(v) for v in sd.values())
    if isinstance(sd, (list, tuple)):
        return all(_finite_state(v) for v in sd)
    if isinstance(sd, float):
        return math.isfinite(sd)
    return True


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Any = None,
                    scaler: Any = None, *, step: int, guard_state: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> str:
    """Write one checkpoint atomically and durably (see the module docstring)."""
    from ..sinks.jsonl import encode
    payload = {
        "format": FORMAT, "version": 1, "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "guard": json.dumps(encode(guard_state), allow_nan=False) if guard_state is not None else None,
        "extra": extra,
    }
    path = os.fspath(path)
    atomic_write(path, lambda fh: torch.save(payload, fh), binary=True, prefix=".tmp-ckpt-")
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Any = None,
                    scaler: Any = None, guard: Any = None, *, map_location: Any = "cpu",
                    rng: bool = True) -> dict[str, Any]:
    """Load a trainguard checkpoint into ``model`` (and ``optimizer``, ``scaler``, ``guard``)
    with ``torch.load(weights_only=True)``; returns ``{"step": ..., "extra": ...}``. A file that
    is not a trainguard checkpoint, or holds non-finite values, raises ValueError before
    anything is changed."""
    from ..sinks.jsonl import decode
    try:
        d = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable trainguard checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != 1:
        raise ValueError(f"{path}: not a trainguard checkpoint (expected format {FORMAT!r}, version 1)")
    if not _finite_state(d["model"]) or not _finite_state(d.get("optimizer")):
        raise ValueError(f"{path}: the checkpoint holds non-finite values; it is not loaded")
    if isinstance(optimizer, (list, tuple)):  # the optimizers given to Guard(model, [...])
        from ..chain import OptimizerChain
        optimizer = OptimizerChain(optimizer)
    model.load_state_dict(d["model"])
    if optimizer is not None and d.get("optimizer") is not None:
        optimizer.load_state_dict(d["optimizer"])
    if scaler is not None and d.get("scaler") is not None:
        scaler.load_state_dict(d["scaler"])
    if rng and isinstance(d.get("rng_cpu"), torch.Tensor):
        torch.set_rng_state(d["rng_cpu"])
    if guard is not None and d.get("guard"):
        guard.load_state_dict(decode(json.loads(d["guard"])))
    return {"step": int(d["step"]), "extra": d.get("extra")}


class CheckpointStore:
    """The trainguard checkpoints of one folder: write (keeping the newest ``keep``), find, load."""

    def __init__(self, folder: str | os.PathLike, keep: int = 2) -> None:
        folder = os.fspath(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"checkpoint_dir must be a directory (it is created if missing), "
                             f"got the file {folder!r}")
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"checkpoints (how many to keep) must be a positive integer, got {keep!r}")
        self.folder, self.keep = folder, keep

    def list(self) -> list[tuple[int, str]]:
        """(step, path) of the checkpoints held, oldest first."""
        if not os.path.isdir(self.folder):
            return []
        out = []
        for name in os.listdir(self.folder):
            m = _NAME.match(name)
            if m:
                out.append((int(m.group(1)), os.path.join(self.folder, name)))
        return sorted(out)

    def newest(self, at_or_before: int | None = None) -> tuple[int, str] | None:
        held = [c for c in self.list() if at_or_before is None or c[0] <= at_or_before]
        return held[-1] if held else None

    def save(self, step: int, model: nn.Module, optimizer: Any, scaler: Any,
             guard_state: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> str:
        os.makedirs(self.folder, exist_ok=True)
        path = save_checkpoint(os.path.join(self.folder, checkpoint_name(step)), model, optimizer,
                               scaler, step=step, guard_state=guard_state, extra=extra)
        for _old_step, old in self.list()[:-self.keep]:
            try:
                os.unlink(old)
            except OSError:
                pass
        return path
