"""trainguard: keep neural-network training numerically stable.

    import trainguard as tg
    guard = tg.Guard(model, optimizer)
    ...
    loss.backward()
    guard.step(loss)          # instead of optimizer.step()

or, where a framework calls ``optimizer.step()`` itself::

    optimizer = tg.GuardedOptimizer(torch.optim.AdamW(model.parameters()), model)
"""
from __future__ import annotations

from typing import Any

from .core import DecisionCore
from .monitor import Decision, Monitor
from .policy import DEFAULT_LADDER, Policy
from .samples import BadBatch, SkipSamples, load_bad_samples
from .types import (ACTION_KINDS, FINDING_KINDS, Action, Finding, StepStats,
                    TrainingUnstable)

__version__ = "0.1.0"

__all__ = ["Guard", "GuardedOptimizer", "OptimizerChain", "DecisionCore", "Monitor", "Decision", "Policy", "DEFAULT_LADDER", "Finding", "Action", "StepStats",
           "TrainingUnstable", "BadBatch", "SkipSamples", "load_bad_samples", "FINDING_KINDS", "ACTION_KINDS", "doctor", "repair", "locate", "load_checkpoint",
           "__version__"]


def __getattr__(name: str) -> Any:
    # torch loads on first use of a torch entry point: the decision core (DecisionCore,
    # Policy, the detectors, the records) works where torch is not installed
    if name == "Guard":
        from .guard import Guard
        return Guard
    if name == "OptimizerChain":
        from .chain import OptimizerChain
        return OptimizerChain
    if name == "GuardedOptimizer":
        from .optim import GuardedOptimizer
        return GuardedOptimizer
    if name == "doctor":
        from .doctor import doctor
        return doctor
    if name == "repair":
        from .doctor import repair
        return repair
    if name == "load_checkpoint":
        from .remedies.checkpoint import load_checkpoint
        return load_checkpoint
    if name == "locate":
        from .locate import locate
        return locate
    raise AttributeError(f"module 'trainguard' has no attribute {name!r}")
