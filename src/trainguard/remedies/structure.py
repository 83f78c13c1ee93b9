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
function inside ``forward`` (``torch.relu(...)``: the module cannot be swapped from outside),
a recurrent cell it cannot swap for a drop-in gated one (an ``nn.RNN`` subclass, a wrapped
distributed model, recurrent weights frozen or outside the optimizer), and remedies that add
layers (normalisation layers: where they go is the user's architecture).

The menus (first remedy first), from the doctor's prescriptions and the zoo's structural
scenarios (mechanisms §2: He 2015 for ReLU stacks, Glorot 2010 for saturating ones, Lu 2019 for
born-dead ReLUs, Mishkin & Matas 2015 for LSUV):

- ``dead_units`` (born dead): in a narrow layer (< ``NARROW`` = 10 units), ELU + He init
  (Clevert 2016: ELU units cannot die; on the zoo's born-dead width-2 depth-10 net it reaches
  MSE 0.0016 / 0.0019 on seeds 0 / 1 where LeakyReLU(0.1) + He ended at 0.095 on seed 0:
  ``trainguard zoo --only signal_dying_relu_born_dead --seeds 2 --structural``), then
  LeakyReLU(0.1) + He init, then He init alone; in wider layers LeakyReLU(0.1) + He first,
  then ELU + He, then He init;
- ``vanishing_gradient``: with tanh units only, orthogonal init (gain 1 puts tanh at the edge
  of chaos: Saxe et al. 2014, Pennington et al. 2017; it cured both zoo tanh phases where
  ReLU + He left a 50-layer net unstable), then ReLU + He init, then LSUV; with sigmoid units,
  ReLU + He init, then LSUV; with ReLU-family units, He init, then LeakyReLU(0.1) + He init,
  then LSUV — unless the net is deep for its width (the doctor's
  :data:`~trainguard.doctor.prescribe.DEEP_NARROW`: sum of 1/width >= 0.1), where LSUV comes
  first, then He init, then LeakyReLU(0.1) + He (the zoo's 30 x 128 ReLU/Xavier net in this
  mode, seeds 0-4, ``python bench/lsuv_vs_he.py``: LSUV 0.30 / 0.98 / 0.99 / 0.62 / 0.40
  held-out cross-entropy, all below the criterion 1.0; He init first 0.79 / 1.42 / 1.07 /
  1.27 / 0.86, 2 of 5); otherwise orthogonal init, then LSUV;
- ``saturation`` (activations, not attention): tanh only: orthogonal init first; then Xavier
  init, then ReLU + He init;
- ``plateau`` whose cause is the optimizer's numerics (never a plain plateau): Adam's epsilon
  trap (``evidence["cause"] == "adam_epsilon"``): eps lowered to 1e-3 x the RMS of
  sqrt(v_hat), the prescription of Wortsman et al. 2023 (moments kept: they are right);
  16-bit update swamping (``"update_swamping"``): fp32 master weights kept by the Guard
  (:mod:`trainguard.remedies.master`; Micikevicius et al. 2018);
- ``plateau`` beside a gradient explosion (a plain plateau — no cause of its own — and a
  ``grad_explosion`` within ``COLLAPSE_WINDOW`` = 100 steps of each other, in either order; the
  plateau rule already requires that the loss never halved): the explosion knocked the run onto
  a plateau it never left, so nothing learnt is lost by starting again — every module with
  ``reset_parameters`` is re-initialised (PyTorch's defaults), the optimizer state cleared, and
  the learning rate cut to ``RESTART_LR`` = 1/4 for good. The prescription of Liu et al. 2019
  and Xiong et al. 2020 for a post-LN Transformer collapsed by a high LR without warmup is a
  lower peak LR; on the zoo's Z11 (``transformer_postln_warmup``) the bare run at lr/4 from the
  start passes on seed 0 (held-out 1.39 against < 2.0), and re-started at the steps the
  collapse is recognised (138 / 201) it passes on seeds 0 / 1 (1.63 / 1.76);
- ``vanishing_gradient`` through time in a plain ``nn.RNN`` (the through-time probe of
  :mod:`trainguard.detect.gradients`): the module is replaced by an ``nn.GRU`` of the same
  size, layers, direction and batch layout — a drop-in cell (same call, same outputs and
  hidden-state shapes; its gates give the gradient an additive path through time, Cho et al.
  2014; Chung et al. 2014) — its parameters take the old ones' places in the optimizer's
  parameter groups (same hyperparameters, fresh state) and in the Guard's probe. On the zoo's
  Z5 vanishing twin (tanh RNN, rho 0.9, T = 100) the Guard swaps at the step the vanishing
  is recognised (150) and the run ends at held-out MSE 0.0009 / 0.0014 on seeds 0 / 1 against
  < 0.05 (the RNN: 0.17; ``trainguard zoo --only recurrent_vanishing_rnn --seeds 2 --structural``);
- ``divergence`` whose cause is the output logits' common-mode drift (``"logit_drift"``,
  :mod:`trainguard.detect.logits`): weight decay 0.1 in every parameter group that has none
  (Wortsman et al. 2023: AdamW weight decay holds log Z near 0; on the zoo's Z13, decay 0.1 from
  the start ends with log Z +4.4 and no precision penalty).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..clone import deepcopy_model
from ..stats import activation_kind
from ..types import Finding

#: the learning-rate scale kept after a restart from a collapse (module docstring: the zoo's
#: Z11 passes at lr/4 from the start, 1.39 on seed 0, and re-started at the plateau)
RESTART_LR = 0.25
#: a plain plateau and a gradient explosion at most this many steps apart (either order) are a
#: collapse. 100: the plateau rule's patience (detect.progress.PlateauDetector), so the
#: explosion falls inside the stretch the plateau describes or right after its report. Over the
#: zoo's 92 runs (``trainguard zoo --seeds 2 --no-baselines --structural --json``, the guarded
#: runs' findings) only Z11 has the pair (seed 0: explosion 98, plateau 138; seed 1: plateau
#: 184, explosion 201); the nearest other pair is 252 steps apart (Z13 seed 0). Loss spikes do
#: not count: Z13 has them 13-66 steps after plateau reports in a run that goes on improving.
COLLAPSE_WINDOW = 100

#: finding kinds a structural repair answers
STRUCTURAL = ("dead_units", "vanishing_gradient", "saturation", "plateau")
#: plateau causes a structural repair answers (evidence["cause"] of detect.optimizer)
PLATEAU_CAUSES = {"adam_epsilon": "optim:eps", "update_swamping": "precision:master"}
#: remedies that change only the optimizer or its arithmetic, not the model's function (the
#: loss and gradient windows of the other detectors stay valid across them)
OPTIMIZER_ONLY = frozenset({"optim:eps", "optim:weight_decay", "precision:master"})
#: findings of other kinds a structural repair answers, by (kind, evidence["cause"])
CAUSED = {("divergence", "logit_drift"): "optim:weight_decay"}
#: the weight decay turned on for a logit drift (the zoo's Z13 calibration, in its module
#: docstring: AdamW weight_decay 0.1 from the start holds log Z at +4.4, penalty 0.000)
WEIGHT_DECAY = 0.1
#: the new eps is this fraction of the RMS of sqrt(v_hat) (Wortsman et al. 2023, arXiv
#: 2309.14322: eps ~1e-3 x the gradient RMS keeps Adam scale-invariant)
EPS_FRACTION = 1e-3
_SATURATING = {"sigmoid", "tanh", "hardtanh", "hardsigmoid"}
_RELU_LIKE = {"relu", "relu6", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "celu"}


def menu(f: Finding, model: nn.Module, collapse: bool = False) -> list[str]:
    """The remedies to try for ``f``, first first (see the module docstring); ``collapse``: a
    plain plateau beside a gradient explosion."""
    acts = {activation_kind(m) for m in model.modules()} - {None}
    if f.kind == "dead_units":
        if _narrow(f):
            return ["act:elu+init:he", "act:leaky+init:he", "init:he"]
        return ["act:leaky+init:he", "act:elu+init:he", "init:he"]
    if f.kind == "vanishing_gradient":
        if _plain_rnn(model, f) is not None:
            return ["cell:gru"]
        if acts & _SATURATING == {"tanh"}:
            return ["init:orthogonal", "act:relu+init:he", "init:lsuv"]
        if acts & _SATURATING:
            return ["act:relu+init:he", "init:lsuv"]
        if acts & _RELU_LIKE:
            from ..doctor.prescribe import DEEP_NARROW, width_depth_ratio
            if width_depth_ratio(model) >= DEEP_NARROW:  # deep for its width: the doctor's order
                return ["init:lsuv", "init:he", "act:leaky+init:he"]
            return ["init:he", "act:leaky+init:he", "init:lsuv"]
        return ["init:orthogonal", "init:lsuv"]
    if f.kind == "saturation":
        if acts & _SATURATING == {"tanh"}:
            return ["init:orthogonal", "init:xavier", "act:relu+init:he"]
        return ["init:xavier", "act:relu+init:he"]
    if f.kind == "plateau":
        cause = cause_of(f)
        if collapse and cause is None:
            return ["restart:lr"]
        return [PLATEAU_CAUSES[cause]] if cause in PLATEAU_CAUSES else []
    key = (f.kind, cause_of(f))
    return [CAUSED[key]] if key in CAUSED else []


#: a dead ReLU layer narrower than this is "narrow": born-dead by width (Lu et al. 2019: a
#: width-N layer is born dead with probability ~2^-N; width 10 x depth 10: 0.13 %), where ELU
#: is the cure; in wide layers the dead units come from the init or the LR and LeakyReLU + He
#: keeps what the network already is (``python bench/doctor_repair.py --seeds 3 --steps 400``
#: with ELU first everywhere: ELU + He on its 30-layer ReLU/Xavier MLP: 0.61-0.75
#: accuracy against 0.89 for He init, bench/doctor_repair.py)
NARROW = 10


def _plain_rnn(model: nn.Module, f: Finding) -> tuple[nn.Module, str, nn.RNN] | None:
    """(parent, attribute, module) of the plain ``nn.RNN`` whose gradient ``f`` says vanishes
    through time, or None (another finding, another module, a subclass of ``nn.RNN``)."""
    if f.kind != "vanishing_gradient" or not isinstance(f.evidence, dict) \
            or not f.evidence.get("through_time") or not f.where:
        return None
    from ..names import clean_name
    for name, mod in model.named_modules():
        if type(mod) is nn.RNN and name and clean_name(name, "") == f.where:
            base, _, attr = name.rpartition(".")
            return (model.get_submodule(base) if base else model), attr, mod
    return None


def _narrow(f: Finding) -> bool:
    layers = f.evidence.get("layers") if isinstance(f.evidence, dict) else None
    units = [v.get("units") for v in layers.values()] if isinstance(layers, dict) else []
    units = [u for u in units if isinstance(u, (int, float)) and u > 0]
    return bool(units) and min(units) < NARROW


def rescue_menu(f: Finding, model: nn.Module) -> list[str]:
    """Before a halt for exhausted rollbacks: a residual network without normalisation whose
    branches add variance at every block blows up at every restart (mechanisms §2.9: x3 per
    block, ~1e12 after 50); zero-initialising the last layer of every branch makes each block
    the identity at the start (Fixup, Zhang et al. 2019; ReZero, Bachlechner et al. 2020)."""
    from ..doctor.propagation import residual_blocks
    if f.kind in ("nonfinite", "divergence", "grad_explosion", "loss_spike") \
            and residual_blocks(model):
        return ["init:zero_last"]
    return []


def tried_key(f: Finding) -> str:
    """What the remedies tried are counted under: the kind, or ``kind:cause`` for a finding
    answered by its cause (a logit drift is not the divergence a rescue answers)."""
    return f"{f.kind}:{cause_of(f)}" if (f.kind, cause_of(f)) in CAUSED else f.kind


def cause_of(f: Finding) -> Any:
    """The finding's ``evidence["cause"]``, or None."""
    return f.evidence.get("cause") if isinstance(f.evidence, dict) else None


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
    if isinstance(mod, nn.RNNBase) and f.kind == "vanishing_gradient" \
            and (type(mod) is not nn.RNN or not swappable_cell(model, mod)):
        return (f"{where} is a recurrent cell whose gradient vanishes through time and the Guard "
                f"cannot swap it ({type(mod).__name__}"
                + (" inside a distributed wrapper" if _wrapped(model) else "")
                + "): use nn.GRU or nn.LSTM in the model's code")
    return None


def _wrapped(model: nn.Module) -> bool:
    """A distributed wrapper (DDP, FSDP): its gradient buckets hold the parameters it was built
    with, so a module swap from outside would leave them behind."""
    from torch.nn.parallel import DistributedDataParallel
    return isinstance(model, DistributedDataParallel) or "FullyShardedDataParallel" in type(model).__name__


def swappable_cell(model: nn.Module, mod: nn.Module) -> bool:
    """A plain ``nn.RNN`` the Guard can replace: not under a distributed wrapper, every
    parameter trainable (a frozen cell was frozen on purpose)."""
    return type(mod) is nn.RNN and not _wrapped(model) \
        and all(p.requires_grad for p in mod.parameters())


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
        #: the Guard's executor (fp32 master weights are kept around its optimizer step)
        self.executor: Any = None
        #: the Guard's learning-rate controller (a restart cuts its scale)
        self.lr: Any = None
        #: the Guard's rebinding of replaced parameters (old, new) in its probe (a cell swap)
        self.rebind: Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]], None] | None = None
        self._cell_undo: tuple[nn.Module, str, nn.Module, list] | None = None
        self._last: str | None = None
        self._lr_before: dict | None = None
        self._plateau: Finding | None = None  # the last plain plateau reported
        self._explosion: int | None = None  # the step of the last gradient explosion
        self._collapse: Finding | None = None  # the plateau recognised as a collapse
        #: the initialisation an earlier repair of this run chose (``init:he``, ...): a restart
        #: re-initialises with it, not with PyTorch's defaults it replaced
        self._init: str | None = None
        self._init_before: str | None = None  # what undo puts back

    def pick(self, findings: list[Finding]) -> Finding | None:
        """The structural finding to act on this step, if any: dead units first (they cause the
        vanishing gradient reported beside them), then saturation, then a vanishing gradient."""
        order = {"dead_units": 0, "saturation": 1, "vanishing_gradient": 2, "plateau": 3}
        collapse = self._collapsed(findings)
        if collapse is not None:
            return collapse
        for f in sorted(findings, key=lambda f: order.get(f.kind, 9)):
            if (f.kind, cause_of(f)) in CAUSED:
                return f
            if f.kind not in STRUCTURAL:
                continue
            if cause_of(f) == "no_gradient":
                continue  # the loss does not reach the module: no change to it helps
            if f.kind == "plateau" and cause_of(f) not in PLATEAU_CAUSES:
                continue  # a plain plateau: nothing structural to change
            if f.kind == "dead_units" and isinstance(f.evidence, dict) \
                    and f.evidence.get("cause") == "killed":
                continue  # killed during training: the rollback + LR backoff ladder answers it
            return f
        return None

    def _collapsed(self, findings: list[Finding]) -> Finding | None:
        """The plain plateau to answer as a collapse this step: one and a gradient explosion at
        most :data:`COLLAPSE_WINDOW` steps apart, whichever came second being this step's."""
        hit: Finding | None = None
        for f in findings:
            if f.kind == "grad_explosion":
                p = self._plateau
                if p is not None and f.step - p.step <= COLLAPSE_WINDOW:
                    hit = p
                self._explosion = f.step
        for f in findings:
            if f.kind == "plateau" and cause_of(f) is None:
                self._plateau = f
                if self._explosion is not None and f.step - self._explosion <= COLLAPSE_WINDOW:
                    hit = f
        if hit is not None:
            self._collapse = hit
        return hit

    def key(self, f: Finding) -> str:
        """What the remedies tried for ``f`` are counted under (:func:`tried_key`; a collapse
        apart from the optimizer-numerics plateaus)."""
        return "plateau:collapse" if f is self._collapse else tried_key(f)

    def next_remedy(self, f: Finding) -> str | None:
        options = menu(f, self.model, collapse=f is self._collapse)
        i = self.tried.get(self.key(f), 0)
        if i >= len(options) or self.changes >= self.max_changes:
            return None
        return options[i]

    @torch.no_grad()
    def apply(self, f: Finding, remedy: str, batch: Any = None) -> list[str]:
        """Apply ``remedy`` to the live model; returns the changes in words."""
        from ..doctor.repair import apply_remedy
        self.undo = (deepcopy_model(self.model), copy.deepcopy(self.optimizer.state_dict()))
        self._last = remedy
        self._lr_before = self.lr.state_dict() if self.lr is not None else None
        self._init_before = self._init
        own = {"optim:eps": self._eps, "precision:master": self._master,
               "optim:weight_decay": self._weight_decay,
               "restart:lr": lambda: self._restart(batch),
               "cell:gru": lambda: self._cell(f)}.get(remedy)
        if own is not None:  # remedies of their own (not apply_remedy's activation/init changes)
            change = own()
            self.tried[self.key(f)] = self.tried.get(self.key(f), 0) + 1
            self.changes += 1
            return [change] if change else []
        parts = [p for p in remedy.split("+") if not (p == "init:lsuv" and batch is None)]
        if not parts:
            parts = ["init:orthogonal"]  # LSUV needs a batch: its orthogonal start alone
        was_training = self.model.training
        changes, _over = apply_remedy(self.model, "+".join(parts),
                                      batch=(batch, None) if batch is not None else None)
        self.model.train(was_training)
        inits = [p for p in parts if p.startswith("init:")]
        if inits:
            # the moments and step counts describe weights that no longer exist
            self.optimizer.state.clear()
            self._init = inits[-1]
        self.tried[self.key(f)] = self.tried.get(self.key(f), 0) + 1
        self.changes += 1
        return changes

    @torch.no_grad()
    def _eps(self) -> str:
        """Adam's eps lowered to EPS_FRACTION x the RMS of sqrt(v_hat) in each group."""
        out = []
        for gi, g in enumerate(self.optimizer.param_groups):
            if "eps" not in g or "betas" not in g:
                continue
            tot, n = 0.0, 0
            for p in g["params"]:
                st = self.optimizer.state.get(p, {})
                v, t = st.get("exp_avg_sq"), st.get("step")
                if v is None or t is None:
                    continue
                bc = max(1 - float(g["betas"][1]) ** float(t), 1e-12)
                tot += float(v.double().sum()) / bc
                n += v.numel()
            if n == 0 or tot <= 0:
                continue
            new = max(EPS_FRACTION * (tot / n) ** 0.5, 1e-30)
            old = float(g["eps"])
            if new < old:
                g["eps"] = new
                out.append(f"group {gi}: eps {old:g} -> {new:.3g}")
        return ("Adam eps lowered to 1e-3 x the RMS of sqrt(v_hat): " + "; ".join(out)) if out else ""

    @torch.no_grad()
    def _restart(self, batch: Any = None) -> str:
        """Start again from PyTorch's default initialisation at ``RESTART_LR`` of the learning
        rate (see the module docstring): every module with ``reset_parameters``, the optimizer
        state cleared; parameters outside such modules keep their values. When an earlier repair
        of this run chose the initialisation (He init with ReLU in place of a deep sigmoid
        stack's), the weight layers get that one again: PyTorch's default undid it, and a
        10-layer ReLU stack restarted at the default init sat at chance for good (the digits run
        of tests/test_structural_repair.py, on a machine where it collapsed after the repair)."""
        n = 0
        for m in self.model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset) and next(m.parameters(recurse=False), None) is not None:
                reset()
                n += 1
        self.optimizer.state.clear()
        init = ""
        if self._init is not None:
            from ..doctor.repair import apply_remedy
            how = self._init if self._init != "init:lsuv" or batch is not None else "init:orthogonal"
            was_training = self.model.training
            apply_remedy(self.model, how, batch=(batch, None) if batch is not None else None)
            self.model.train(was_training)
            init = f", then {how} as this run's earlier repair chose"
        self._plateau = self._explosion = None  # what they described is gone
        lr = ""
        if self.lr is not None:
            before, after = self.lr.backoff(RESTART_LR, recover=False)
            lr = f"; learning-rate scale {before:g} -> {after:g} (kept)"
        return (f"collapsed onto a plateau beside a gradient explosion: {n} modules re-initialised "
                f"(PyTorch defaults{init}), optimizer state cleared{lr}")

    @torch.no_grad()
    def _cell(self, f: Finding) -> str:
        """Replace the plain ``nn.RNN`` named by ``f`` with an ``nn.GRU`` of the same shape (see
        the module docstring); its parameters take the old ones' places in the optimizer and
        the Guard's probe, with fresh optimizer state."""
        found = _plain_rnn(self.model, f)
        if found is None or self.rebind is None:
            return ""
        parent, attr, mod = found
        if not swappable_cell(self.model, mod) or getattr(self.executor, "master", None) is not None:
            return ""  # fp32 masters are kept for the parameters they were built on
        w = mod.weight_ih_l0
        new = nn.GRU(mod.input_size, mod.hidden_size, mod.num_layers, bias=mod.bias,
                     batch_first=mod.batch_first, dropout=float(mod.dropout),
                     bidirectional=mod.bidirectional, device=w.device, dtype=w.dtype)
        new.train(mod.training)
        old_p, new_p = dict(mod.named_parameters()), dict(new.named_parameters())
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        if set(old_p) != set(new_p) or not all(id(p) in held for p in old_p.values()):
            return ""
        pairs = [(old_p[n], new_p[n]) for n in old_p]
        self._replace(pairs)
        setattr(parent, attr, new)
        self._cell_undo = (parent, attr, mod, pairs)
        n0 = sum(p.numel() for p in old_p.values())
        n1 = sum(p.numel() for p in new_p.values())
        return (f"{f.where}: nn.RNN({mod.nonlinearity}, {mod.input_size} -> {mod.hidden_size}, "
                f"{mod.num_layers} layer{'s' if mod.num_layers > 1 else ''}) replaced by an "
                f"nn.GRU of the same shape ({n0} -> {n1} parameters, PyTorch's default init), "
                "its parameters in the old ones' places in the optimizer, state started afresh")

    def _replace(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Each old parameter's place in the optimizer's groups (and the Guard's probe) goes to
        its new one; the old one's optimizer state is dropped."""
        new_of = {id(o): n for o, n in pairs}
        for g in self.optimizer.param_groups:
            ps = g["params"]
            for i, p in enumerate(ps):
                if id(p) in new_of:
                    ps[i] = new_of[id(p)]
        for o, n in pairs:
            self.optimizer.state.pop(o, None)
            self.optimizer.state.pop(n, None)
        assert self.rebind is not None
        self.rebind(pairs)

    def _weight_decay(self) -> str:
        out = []
        for gi, g in enumerate(self.optimizer.param_groups):
            if "weight_decay" in g and not g["weight_decay"]:
                g["weight_decay"] = WEIGHT_DECAY
                out.append(f"group {gi}")
        return (f"weight decay 0 -> {WEIGHT_DECAY} in {', '.join(out)} "
                f"({type(self.optimizer).__name__})") if out else ""

    def _master(self) -> str:
        from .master import MasterWeights
        ex = self.executor
        if ex is None or ex.master is not None:
            return ""
        mw = MasterWeights(self.optimizer)
        if not len(mw):
            return ""
        ex.master = mw
        ex.measure.mastered = {id(p) for p in mw.params}
        return mw.describe()

    @torch.no_grad()
    def restore(self) -> bool:
        """Put back the model (structure and weights) and optimizer state from before the last
        change. Returns False when there is nothing to undo."""
        if self.undo is None:
            return False
        old, opt_state = self.undo
        if self._last == "cell:gru" and self._cell_undo is not None:
            parent, attr, mod, pairs = self._cell_undo
            self._replace([(n, o) for o, n in pairs])
            setattr(parent, attr, mod)
            self.optimizer.load_state_dict(opt_state)
            self.undo = self._cell_undo = None
            return True
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
        ex = self.executor
        if ex is not None and ex.master is not None and self._last == "precision:master":
            ex.master = None
            ex.measure.mastered = set()
        if self._last == "restart:lr" and self.lr is not None and self._lr_before is not None:
            self.lr.load_state_dict(self._lr_before)
        self._init = self._init_before
        self.undo = None
        return True
