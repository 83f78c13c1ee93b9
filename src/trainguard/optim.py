"""``GuardedOptimizer``: the Guard as a ``torch.optim.Optimizer``, the seam every framework needs.

    opt = tg.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4), model)
    ...
    loss.backward()
    opt.step()              # measures, decides, applies or skips; opt.guard has the findings

Lightning, the Hugging Face Trainer and accelerate call ``optimizer.step()`` themselves (Lightning
with a closure that runs the forward and backward passes). Handing them a ``GuardedOptimizer``
puts the Guard where only the optimizer can act: at the update. Everything else (param_groups,
state, state_dict, load_state_dict, zero_grad, add_param_group, LR schedulers) is the wrapped
optimizer's.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .chain import init_hook_registries
from .guard import Guard, closure_loss


def _mark(optimizer: torch.optim.Optimizer) -> None:
    if getattr(optimizer, "_trainguard_guarded", False):
        raise ValueError("this optimizer already has a GuardedOptimizer: two guards on one "
                         "optimizer would measure and step it twice; keep one")
    optimizer._trainguard_guarded = True  # type: ignore[attr-defined]


class GuardedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` (built on ``model``'s parameters) so that ``step()`` is guarded.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap.
        model: the ``nn.Module`` it trains (wrappers welcome: DDP, ``torch.compile``).
        **guard_options: any :class:`~trainguard.Guard` keyword (``scaler``, ``policy``,
            ``clip``, ``sync``, ``log``, ``console``, ...).

    ``opt.guard`` is the Guard: findings, actions, summary, state_dict.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, **guard_options: Any) -> None:
        if isinstance(optimizer, GuardedOptimizer):
            raise TypeError("the optimizer is already a GuardedOptimizer; wrap the plain one once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GuardedOptimizer wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the torch.nn.Module the optimizer trains, got "
                            f"{type(model).__name__}")
        mine = {id(p) for p in model.parameters()}
        theirs = [p for g in optimizer.param_groups for p in g["params"]]
        if theirs and not any(id(p) in mine for p in theirs):
            raise ValueError("none of the optimizer's parameters belongs to the model: build the "
                             "optimizer on model.parameters() and pass that model")
        _mark(optimizer)
        init_hook_registries(self)  # no second set of param_groups
        self.optimizer = optimizer
        try:
            self.guard = Guard(model, optimizer, **guard_options)
        except Exception:
            optimizer._trainguard_guarded = False  # type: ignore[attr-defined]
            raise

    # -- the wrapped optimizer's state, shared (schedulers write param_groups[i]["lr"]) --------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state_dict (loadable into the bare optimizer); the Guard's
        own state is ``opt.guard.state_dict()``."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """The wrapped optimizer's: the Guard measures and snapshots the added parameters from
        the next step on."""
        self.optimizer.add_param_group(param_group)

    # -- the guarded step ------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (under ``torch.enable_grad()``) when given and take its return value
        as the loss; else the losses shown by ``opt.guard.observe_loss``, else the loss the
        model returned (:mod:`trainguard.model_loss`). Then measure,
        decide, apply or skip the update, and return the loss."""
        if closure is None:
            self.guard.step(None)
            return None
        with torch.enable_grad():
            loss = closure()
        # the closure goes on to an optimizer that needs one (LBFGS), whose first call gets
        # this evaluation back; the others are stepped without it
        self.guard._closure_step(closure_loss(loss), loss, closure)
        return loss

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a GuardedOptimizer is not pickled: save opt.state_dict() (the wrapped "
                        "optimizer's) and opt.guard.state_dict()")
