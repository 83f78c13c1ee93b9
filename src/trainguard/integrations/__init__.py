"""Adapters for the frameworks people train with; each imports its framework lazily.

- :mod:`trainguard.integrations.lightning`: ``GuardCallback`` for PyTorch Lightning 2.x.
- Any framework that calls ``optimizer.step()`` itself (accelerate, a custom trainer):
  :class:`trainguard.GuardedOptimizer`.
"""
