"""Adapters for the frameworks people train with; each imports its framework lazily.

- :mod:`trainguard.integrations.lightning`: ``GuardCallback`` for PyTorch Lightning 2.x.
- Any framework that calls ``optimizer.step()`` itself (accelerate, a custom trainer):
  :class:`trainguard.GuardedOptimizer`.
"""

from typing import Any


def check_adapter_options(guard_options: dict[str, Any], who: str, scaler_from: str) -> None:
    """Options a framework adapter cannot honour: the framework takes the optimizer step (so
    the Guard decides on the host first: no ``sync=False``) and owns the GradScaler."""
    if guard_options.get("sync") is False:
        raise ValueError(f"{who} does not support sync=False: the framework takes the optimizer "
                         "step, so the Guard decides on the host before it")
    if "scaler" in guard_options:
        raise ValueError(f"{who} takes the GradScaler from {scaler_from}; do not pass scaler=")
