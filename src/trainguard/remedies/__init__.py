"""Remedies: the only code that changes the user's gradients, optimizer, schedule or weights."""
from .clip import AGC, AdaptiveClip, FixedNormClip, make_clipper
from .lr import LRController
from .snapshot import Snapshot, SnapshotStore

__all__ = ["AGC", "AdaptiveClip", "FixedNormClip", "make_clipper", "LRController",
           "Snapshot", "SnapshotStore"]
