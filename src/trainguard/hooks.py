"""Hooks that do not travel with the user's model (issue #12, item 9).

The Guard keeps a forward hook (and, when the model has Dropout-like modules or pre-hooks of
its own, a forward pre-hook) on the model's root for its whole life (to capture each step's
inputs for locate), and arms more on sampled steps (the activation probes). Stored in the
module's hook dicts, they were pickled by ``torch.save(model)`` (which then failed, or could
only be loaded with the whole Guard and its closures) and copied by ``copy.deepcopy(model)``
and ``torch.optim.swa_utils.AveragedModel`` (an EMA copy held a deep copy of the optimizer).

:func:`register_private` registers a hook as usual, in a hook dict whose pickled and
deep-copied form leaves out the hooks registered through it: ``torch.save(model)`` writes a
plain ``OrderedDict`` of the other hooks, a copy gets no trainguard hook. The swap to that dict
happens only when the module's dict is empty (no other handle points at it); otherwise the
hook is registered plainly and the module must be detached (``guard.close()``) before saving.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

from torch import nn


class _PrivateHooks(OrderedDict):
    """A module hook dict that pickles and deep-copies without the hooks marked private."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.private: set[int] = set()

    def _public(self) -> list[tuple[Any, Any]]:
        return [(k, v) for k, v in self.items() if k not in self.private]

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (OrderedDict, (self._public(),))

    def __deepcopy__(self, memo: dict) -> OrderedDict:
        return OrderedDict((k, copy.deepcopy(v, memo)) for k, v in self._public())

    def __copy__(self) -> OrderedDict:
        return OrderedDict(self._public())


def register_private(module: nn.Module, attr: str, register: Callable[[], Any]) -> Any:
    """``register()`` (e.g. ``lambda: module.register_forward_pre_hook(fn)``) with the new hook
    left out of ``module``'s pickled and copied state; ``attr`` names the hook dict it lands
    in (``"_forward_pre_hooks"`` or ``"_forward_hooks"``). Returns the handle."""
    d = module.__dict__.get(attr)
    if type(d) is OrderedDict and not d:
        d = _PrivateHooks()
        object.__setattr__(module, attr, d)
    handle = register()
    if isinstance(d, _PrivateHooks) and handle.id in d:
        d.private.add(handle.id)
    return handle


def foreign_hooks(module: nn.Module, attr: str) -> bool:
    """``module`` holds hooks in ``attr`` (e.g. ``"_forward_pre_hooks"``) other than those
    registered through :func:`register_private`."""
    d = module.__dict__.get(attr)
    if not d:
        return False
    if isinstance(d, _PrivateHooks):
        return any(k not in d.private for k in d)
    return True
