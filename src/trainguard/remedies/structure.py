"""Structural repair inside the run (opt-in: ``tg.Policy(structural="repair")``).

Skip, clip, LR backoff and rollback cannot cure a broken structure: a born-dead ReLU layer, a
deep sigmoid stack whose gradient vanishes, saturated tanh units. With ``structural="repair"``,
when such a finding is reported the Guard changes the live model the way the doctor's
prescriptions would — swap the activation modules, re-initialise the weight layers (He, Xavier,
orthogonal, LSUV) — resets the optimizer state the change invalidates, drops the rollback
snapshots of the old structure (a fresh verified one is taken), watches the new structure
closely (activation probes every few steps), and goes on. If the same kind of finding comes
back, the next remedy of its menu is tried; when the menu is spent the run halts with the story.
Each change is an :class:`~trainguard.types.Action` of kind ``restructure`` whose ``detail``
says what changed where; ``guard.undo_restructure()`` puts back the model and optimizer state
from just before the last change.

What it does not attempt (reported with the line to change instead): an activation called as a
function inside ``forward`` (``torch.relu(...)``: the module cannot be swapped from outside), a
recurrent network whose gradient vanishes through time (use LSTM/GRU), and remedies that add
parameters (normalisation layers: the optimizer would need rebuilding).

The menus (first remedy first), from the doctor's prescriptions and the zoo's structural
scenarios (mechanisms §2: He 2015 for ReLU stacks, Glorot 2010 for saturating ones, Lu 2019 for
born-dead ReLUs, Mishkin & Matas 2015 for LSUV):

- ``dead_units`` (born dead): LeakyReLU(0.1) + He init, then He init alone;
- ``vanishing_gradient``: with sigmoid/tanh units, ReLU + He init, then LSUV; with ReLU-family
  units, He init, then LeakyReLU(0.1) + He init, then LSUV; otherwise orthogonal init, then
  LSUV;
- ``saturation`` (activations, not attention): Xavier init, then ReLU + He init.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..stats import activation_kind
from ..types import Finding

#: finding kinds a structural repair answers
STRUCTURAL = ("dead_units", "vanishing_gradient", "saturation")
_SATURATING = {"sigmoid", "tanh", "hardtanh", "hardsigmoid"}
_RELU_LIKE = {"relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "celu"}


def menu(f: Finding, model: nn.Module) -> list[str]:
    """The remedies to try for ``f``, first first (see the module docstring)."""
    acts = {activation_kind(m) for m in model.modules()} - {None}
    if f.kind == "dead_units":
        return ["act:leaky+init:he", "init:he"]
    if f.kind == "vanishing_gradient":
        if acts & _SATURATING:
            return ["act:relu+init:he", "init:lsuv"]
        if acts & _RELU_LIKE:
            return ["init:he", "act:leaky+init:he", "init:lsuv"]
        return ["init:orthogonal", "init:lsuv"]
    if f.kind == "saturation":
        return ["init:xavier", "act:relu+init:he"]
    return []


def needs_code(f: Finding, model: nn.Module) -> str | None:
    """Why ``f`` cannot be repaired from outside the user's code (the line to change), or None."""
    modules = dict(model.named_modules())
    if f.kind == "saturation" and isinstance(f.evidence, dict) and f.evidence.get("attention"):
        return ("attention saturation: add qk-layernorm or soft-cap the attention logits in the "
                "attention code")
    where = f.where or ""
    if where and where not in modules and "." in where:
        base, fn = where.rsplit(".", 1)
        if fn.rstrip("0123456789") in ("relu", "sigmoid", "tanh", "hardtanh", "gelu", "silu",
                                       "leaky_relu", "elu", "relu6"):
            repl = "torch.nn.functional.leaky_relu(x, 0.1)" if f.kind == "dead_units" else "torch.relu(x)"
            return (f"{fn} is called as a function on {base}'s output inside forward(): change "
                    f"that call to {repl} (or use an nn module), the Guard cannot swap a function")
    mod = modules.get(where)
    if isinstance(mod, nn.RNNBase) and f.kind == "vanishing_gradient" and type(mod) is nn.RNN:
        return f"{where} is a plain RNN whose gradient vanishes through time: use nn.LSTM or nn.GRU"
    return None


class Restructurer:
    """Carries out structural repairs for one Guard (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 max_changes: int = 4) -> None:
        self.model, self.optimizer = model, optimizer
        self.max_changes = max_changes
        self.tried: dict[str, int] = {}      # finding kind -> remedies tried so far
        self.changes = 0
        self.undo: tuple[nn.Module, dict[str, Any]] | None = None
        self.reported_code: set[str] = set()

    def pick(self, findings: list[Finding]) -> Finding | None:
        """The structural finding to act on this step, if any: dead units first (they cause the
        vanishing gradient reported beside them), then saturation, then a vanishing gradient."""
        order = {"dead_units": 0, "saturation": 1, "vanishing_gradient": 2}
        for f in sorted(findings, key=lambda f: order.get(f.kind, 9)):
            if f.kind not in STRUCTURAL:
                continue
            if f.kind == "dead_units" and isinstance(f.evidence, dict) \
                    and f.evidence.get("cause") == "killed":
                continue  # killed during training: the rollback + LR backoff ladder answers it
            return f
        return None

    def next_remedy(self, f: Finding) -> str | None:
        options = menu(f, self.model)
        i = self.tried.get(f.kind, 0)
        if i >= len(options) or self.changes >= self.max_changes:
            return None
        return options[i]

    @torch.no_grad()
    def apply(self, f: Finding, remedy: str, batch: Any = None) -> list[str]:
        """Apply ``remedy`` to the live model; returns the changes in words."""
        from ..doctor.repair import apply_remedy
        self.undo = (copy.deepcopy(self.model), copy.deepcopy(self.optimizer.state_dict()))
        parts = [p for p in remedy.split("+") if not (p == "init:lsuv" and batch is None)]
        if not parts:
            parts = ["init:orthogonal"]  # LSUV needs a batch: its orthogonal start alone
        was_training = self.model.training
        changes, _over = apply_remedy(self.model, "+".join(parts),
                                      batch=(batch, None) if batch is not None else None)
        self.model.train(was_training)
        if any(p.startswith("init:") for p in parts):
            # the moments and step counts describe weights that no longer exist
            self.optimizer.state.clear()
        self.tried[f.kind] = self.tried.get(f.kind, 0) + 1
        self.changes += 1
        return changes

    @torch.no_grad()
    def restore(self) -> bool:
        """Put back the model (structure and weights) and optimizer state from before the last
        change. Returns False when there is nothing to undo."""
        if self.undo is None:
            return False
        old, opt_state = self.undo
        params = dict(self.model.named_parameters())
        # the modules first (a swapped activation is a new object), then the weights in place
        for name, child in list(old.named_children()):
            setattr(self.model, name, child)
        for name, p in old.named_parameters():
            if name in params:
                params[name].data.copy_(p.data)
                # the optimizer holds the live parameter objects: keep them in the model
        for name, child in self.model.named_modules():
            for pname, p in list(child.named_parameters(recurse=False)):
                full = f"{name}.{pname}" if name else pname
                if full in params and p is not params[full]:
                    setattr(child, pname, params[full])
        self.optimizer.load_state_dict(opt_state)
        self.undo = None
        return True
