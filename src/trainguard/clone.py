"""A deep copy of a model that is really separate from it, closures included.

``copy.deepcopy`` copies functions by reference. A function stored on a module whose closure
holds parts of the model, as minGPT and karpathy/makemore write their transformer block::

    m = self.mlp = nn.ModuleDict(dict(c_fc=..., c_proj=..., act=NewGELU()))
    self.mlpf = lambda x: m.c_proj(m.act(m.c_fc(x)))

is therefore shared by the copy, and the copy's forward runs the *original's* modules: the
doctor's float64 reference copy failed ("mat1 and mat2 must have the same dtype"), its trial
copies would have trained on, and left gradients in, the user's model, and a structural undo
would have put back blocks whose MLPs were no longer among the optimizer's parameters.
:func:`deepcopy_model` copies the model with ``copy.deepcopy`` and then rebuilds every such
function (module attributes, and the functions in a module's hook dictionaries) with its
closure cells pointing at the copies of what they held.
"""
from __future__ import annotations

import copy
import types
from typing import Any

from torch import nn

__all__ = ["deepcopy_model"]


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with functions that close over parts of the model rebound to
    the copy's parts (see the module docstring)."""
    memo: dict[int, Any] = {}
    new = copy.deepcopy(model, memo)
    done: dict[int, Any] = {}
    for mod in new.modules():
        attrs = vars(mod)
        hooks = [v for k, v in attrs.items() if k.endswith("_hooks") and isinstance(v, dict)]
        for holder in [attrs, *hooks]:
            for k, v in list(holder.items()):
                if isinstance(v, types.FunctionType):
                    f = _rebind(v, memo, done)
                    if f is not v:
                        holder[k] = f
    return new


def _rebind(f: types.FunctionType, memo: dict[int, Any], done: dict[int, Any]) -> Any:
    """``f`` with each closure cell that holds a deep-copied object (or such a function)
    pointing at the copy; ``f`` itself when no cell does."""
    if id(f) in done:
        return done[id(f)]
    done[id(f)] = f  # a function that reaches itself through its closure: kept as it is
    cells = f.__closure__
    if not cells:
        return f
    new_cells = []
    changed = False
    for c in cells:
        try:
            v = c.cell_contents
        except ValueError:  # an empty cell (a name bound later)
            new_cells.append(c)
            continue
        nv = memo.get(id(v), v)
        if nv is v and isinstance(v, types.FunctionType):
            nv = _rebind(v, memo, done)
        if nv is not v:
            changed = True
            new_cells.append(types.CellType(nv))
        else:
            new_cells.append(c)
    if not changed:
        return f
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, tuple(new_cells))
    g.__kwdefaults__ = copy.copy(f.__kwdefaults__)
    g.__dict__.update(f.__dict__)
    g.__qualname__ = f.__qualname__
    done[id(f)] = g
    return g
