"""Remedies. ``clip`` and ``lr`` are torch-free until a torch tensor is touched (they also serve
the NumPy :class:`~trainguard.Monitor`); ``snapshot`` and ``executor`` are the torch side."""
from __future__ import annotations

from typing import Any

from .clip import AGC, AdaptiveClip, FixedNormClip, make_clipper
from .lr import LRController

__all__ = ["AGC", "AdaptiveClip", "FixedNormClip", "make_clipper", "LRController", "Snapshot",
           "SnapshotStore"]


def __getattr__(name: str) -> Any:
    if name in ("Snapshot", "SnapshotStore"):
        from . import snapshot
        return getattr(snapshot, name)
    raise AttributeError(f"module 'trainguard.remedies' has no attribute {name!r}")
