"""``OptimizerChain``: several optimizers of one model, stepped, skipped and rolled back as one.

A model trained by two optimizers at once — ``torch.optim.Muon`` for the hidden weight matrices
and AdamW for the embeddings, norms and biases (Muon takes 2-D parameters only), or separate
optimizers per parameter family — takes one training step in two ``step()`` calls. A NaN batch
must skip both, a rollback must restore both states. Give the Guard the list::

    muon = torch.optim.Muon(matrices, lr=0.02)
    adamw = torch.optim.AdamW(others, lr=3e-4)
    guard = tg.Guard(model, [muon, adamw])          # or tg.OptimizerChain([muon, adamw])
    ...
    loss.backward()
    guard.step(loss)                                # steps muon, then adamw, or neither

The chain is a ``torch.optim.Optimizer`` view over the optimizers it holds: ``param_groups`` is
their groups in order (the same dicts: schedulers built on each optimizer keep working, and the
Guard's LR backoff scales every group), ``state`` reads and writes each parameter's state in the
optimizer that owns it, ``zero_grad`` and ``step`` call each in order, ``state_dict`` is
``{"optimizers": [each one's state_dict]}``. Step hooks are registered on each optimizer, so a
``step()`` called on one of them outside the Guard is seen (and warned about) as before.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable, Sequence

import torch


def init_hook_registries(opt: torch.optim.Optimizer) -> None:
    """torch.optim.Optimizer's hook registries, for a view over other optimizers that does not
    run ``Optimizer.__init__`` (it would make a set of param_groups of its own)."""
    for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                 "load_state_dict_pre", "load_state_dict_post"):
        setattr(opt, f"_optimizer_{name}_hooks", OrderedDict())


class _ChainState(MutableMapping):
    """Each parameter's optimizer state, in the optimizer that owns the parameter."""

    def __init__(self, chain: "OptimizerChain") -> None:
        self._chain = chain

    def __getitem__(self, p: Any) -> Any:
        return self._chain.owner(p).state[p]

    def get(self, p: Any, default: Any = None) -> Any:
        o = self._chain.owner(p, missing_ok=True)
        return default if o is None else o.state.get(p, default)

    def __setitem__(self, p: Any, value: Any) -> None:
        self._chain.owner(p).state[p] = value

    def __delitem__(self, p: Any) -> None:
        del self._chain.owner(p).state[p]

    def __contains__(self, p: object) -> bool:
        o = self._chain.owner(p, missing_ok=True)
        return o is not None and p in o.state

    def __iter__(self) -> Iterator[Any]:
        for o in self._chain.optimizers:
            yield from o.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._chain.optimizers)


class _Handles:
    """One removable handle for a hook registered on every optimizer of a chain."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class OptimizerChain(torch.optim.Optimizer):
    """Several ``torch.optim.Optimizer`` over disjoint parameters of one model, as one.

    Args:
        optimizers: two or more optimizers, stepped in this order. Each parameter belongs to
            one of them; an optimizer whose ``step`` requires a closure (LBFGS) cannot be
            chained (it evaluates the loss again and again inside its own step).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if isinstance(optimizers, torch.optim.Optimizer) or not isinstance(optimizers, (list, tuple)):
            raise TypeError("OptimizerChain expects a list of torch.optim.Optimizer, got "
                            f"{type(optimizers).__name__}")
        opts = list(optimizers)
        if len(opts) < 2:
            raise ValueError(f"OptimizerChain needs two or more optimizers, got {len(opts)}: "
                             "pass a single optimizer as it is")
        for o in opts:
            if not isinstance(o, torch.optim.Optimizer):
                raise TypeError(f"OptimizerChain expects torch.optim.Optimizer items, got "
                                f"{type(o).__name__}")
            if isinstance(o, OptimizerChain):
                raise TypeError("an OptimizerChain inside an OptimizerChain: list the "
                                "optimizers once")
        if len({id(o) for o in opts}) != len(opts):
            raise ValueError("the same optimizer is listed twice in the chain: it would be "
                             "stepped twice a step")
        from .remedies.executor import needs_closure
        for o in opts:
            if needs_closure(o):
                raise ValueError(f"{type(o).__name__} requires a closure in step() (it evaluates "
                                 "the loss several times per step) and cannot be chained with "
                                 "other optimizers")
        init_hook_registries(self)
        self.optimizers = opts
        self._state = _ChainState(self)
        self._owners: dict[int, torch.optim.Optimizer] = {}
        self._owner_key: tuple[int, ...] = ()
        self._index_owners()

    # -- who owns which parameter -------------------------------------------------------------
    def _index_owners(self) -> None:
        owners: dict[int, torch.optim.Optimizer] = {}
        for o in self.optimizers:
            for g in o.param_groups:
                for p in g["params"]:
                    prev = owners.get(id(p))
                    if prev is not None and prev is not o:
                        raise ValueError(f"a parameter of shape {tuple(p.shape)} is held by both "
                                         f"{type(prev).__name__} and {type(o).__name__}: each "
                                         "parameter must be trained by one optimizer of the "
                                         "chain")
                    owners[id(p)] = o
        self._owners = owners
        self._owner_key = tuple(sum(len(g["params"]) for g in o.param_groups)
                                for o in self.optimizers)

    def owner(self, p: Any, missing_ok: bool = False) -> Any:
        """The optimizer of the chain that trains ``p``."""
        o = self._owners.get(id(p))
        if o is None:
            key = tuple(sum(len(g["params"]) for g in o_.param_groups) for o_ in self.optimizers)
            if key != self._owner_key:  # a group was added to one of them since
                self._index_owners()
                o = self._owners.get(id(p))
        if o is None and not missing_ok:
            raise KeyError("this tensor is not a parameter of any optimizer in the chain")
        return o

    # -- the Optimizer surface ----------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError("an OptimizerChain's param_groups are its optimizers' own: set "
                             "them on chain.optimizers[i]")

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        raise AttributeError("an OptimizerChain's state is its optimizers' own: load it with "
                             "load_state_dict")

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizers[0].defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        raise AttributeError("an OptimizerChain has no defaults of its own")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise TypeError("add the group to the optimizer that should train it: "
                        "chain.optimizers[i].add_param_group(...)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step each optimizer in order (the closure, when given, runs once first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        subs = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(subs, list) or len(subs) != len(self.optimizers):
            raise ValueError(f"expected an OptimizerChain state_dict with {len(self.optimizers)} "
                             "optimizers ({'optimizers': [...]}, as chain.state_dict() writes)")
        for o, sd in zip(self.optimizers, subs):
            o.load_state_dict(sd)

    def register_step_pre_hook(self, hook: Callable) -> Any:  # type: ignore[override]
        return _Handles([o.register_step_pre_hook(lambda _o, a, k: hook(self, a, k))
                         for o in self.optimizers])

    def register_step_post_hook(self, hook: Callable) -> Any:  # type: ignore[override]
        return _Handles([o.register_step_post_hook(lambda _o, a, k: hook(self, a, k))
                         for o in self.optimizers])

    def __repr__(self) -> str:
        return f"OptimizerChain([{', '.join(type(o).__name__ for o in self.optimizers)}])"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("an OptimizerChain is not pickled: save chain.state_dict()")


class SchedulerList:
    """Several LR schedulers stepped as one (``Guard(scheduler=[s1, s2])`` with a chain):
    each after every applied update, none on a skipped one."""

    def __init__(self, schedulers: Sequence[Any]) -> None:
        items = list(schedulers)
        if not items:
            raise ValueError("scheduler=[] : give the schedulers, or leave scheduler out")
        for s in items:
            if not callable(getattr(s, "step", None)):
                raise TypeError("scheduler must be a torch LR scheduler (an object with step()), "
                                f"got {type(s).__name__}")
        self.schedulers = items
        self.optimizers = [getattr(s, "optimizer", None) for s in items]

    def step(self) -> None:
        for s in self.schedulers:
            s.step()
