"""The escalation policy: which remedy answers which finding, in one readable table.

Each finding kind has a ladder. The n-th occurrence of a kind within the last ``window``
steps takes the n-th rung; the last rung repeats. A rung may combine actions with "+".
Kinds without a ladder (vanishing_gradient, dead_units, saturation, plateau) are structural:
no online remedy fixes them, so the Guard reports them with prescriptions and acts only if
the user lists them in ``halt_on``. A ladder key may also name a cause, ``"kind:cause"``
(matched against ``finding.evidence["cause"]``), which takes precedence over the kind's
own ladder: units *killed during training* (``dead_units:killed``) were killed by an
oversized step, which a rollback to weights from before the kill plus a lower LR undoes
(Lu et al. 2019; the zoo's ``signal_dying_relu_killed`` and ``data_small_batch``), whereas
units born dead need a new init or architecture.

Repairs run out, and the Guard halts, when a rollback is needed but more than
``max_rollbacks`` were already made or no snapshot exists, or a learning-rate backoff would
take the LR below ``min_lr_scale`` of its scheduled value.

    DEFAULT_LADDER
      nonfinite       skip -> skip -> rollback+lr_backoff (repeats)
      loss_spike      skip -> skip -> rollback+lr_backoff (repeats)
      grad_explosion  clip -> clip -> clip -> clip+lr_backoff (repeats)
      divergence      rollback+lr_backoff (repeats)
      dead_units:killed  rollback+lr_backoff (repeats)
      plateau:learning_rate  rollback+lr_backoff (repeats)
      divergence:logit_drift (empty: reported only)

Sources: skip-then-rollback follows PaLM (Chowdhery 2022: restart ~100 steps before a spike
and skip the batches) and OLMo-core's skip-step optimizers; clipping for exploding gradients
follows Pascanu 2013; the LR backoff on divergence follows the curvature limit eta < 2/lambda
(Cohen 2021).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from .types import ACTION_KINDS, FINDING_KINDS, Finding

DEFAULT_LADDER: dict[str, tuple[str, ...]] = {
    "nonfinite": ("skip", "skip", "rollback+lr_backoff"),
    "loss_spike": ("skip", "skip", "rollback+lr_backoff"),
    "grad_explosion": ("clip", "clip", "clip", "clip+lr_backoff"),
    "divergence": ("rollback+lr_backoff",),
    "dead_units:killed": ("rollback+lr_backoff",),
    "plateau:learning_rate": ("rollback+lr_backoff",),
    "divergence:logit_drift": (),  # reported: a rollback cannot undo a slow drift
}

# Order in which planned actions are carried out within one step.
_ORDER = {"halt": 0, "rollback": 1, "lr_backoff": 2, "skip": 3, "clip": 4}


@dataclass
class Plan:
    """The actions for one step, each with the finding that motivates it."""

    actions: list[tuple[str, Finding]] = field(default_factory=list)

    def kinds(self) -> set[str]:
        return {a for a, _ in self.actions}

    def __bool__(self) -> bool:
        return bool(self.actions)


class Policy:
    """Maps findings to actions through per-kind escalation ladders.

    Args:
        ladder: kind -> sequence of rungs ("skip", "clip+lr_backoff", ...); merged over
            :data:`DEFAULT_LADDER` (give a kind an empty tuple to only report it).
        window: steps over which occurrences of a kind are counted (default 100).
        halt_on: finding kinds that halt the run at once (default none).
        max_rollbacks: rollbacks allowed in the whole run before halting (default 8).
        lr_backoff: factor applied to the LR scale on each backoff (default 0.5).
        lr_cause_backoff: the factor when the finding names the learning rate as its cause
            (``evidence["cause"] == "learning_rate"``: a loss ruined within the first updates
            or right after an LR increase), default 0.1. Such an LR is an order of magnitude
            too high, not a few percent: the failures it answers are 10-100x the working LR
            (issue #9; zoo ``lr_gpt_too_high``, ``lr_gpt_jump``, ``lr_lstm_lm_sgd_too_high``),
            which halving reaches only after 4-7 rollbacks.
        min_lr_scale: smallest LR scale before the Guard gives up (default 1/1024).
        structural: ``"report"`` (default): structural findings (dead units, a vanishing
            gradient, saturated units) are reported with their prescriptions; ``"repair"``:
            the Guard also changes the live model (activation swap, re-initialisation) and goes
            on, each change an action of kind ``restructure`` (see
            :mod:`trainguard.remedies.structure`).
    """

    def __init__(self, ladder: Mapping[str, Sequence[str]] | None = None, *, window: int = 100,
                 halt_on: Iterable[str] = (), max_rollbacks: int = 8, lr_backoff: float = 0.5,
                 min_lr_scale: float = 1 / 1024, lr_cause_backoff: float = 0.1,
                 structural: str = "report") -> None:
        merged = dict(DEFAULT_LADDER)
        for kind, rungs in (ladder or {}).items():
            if isinstance(rungs, str):
                raise ValueError(f"ladder[{kind!r}] must be a sequence of rungs, got the string "
                                 f"{rungs!r} (write ({rungs!r},))")
            merged[kind] = tuple(rungs)
        for kind, rungs in merged.items():
            if kind.split(":", 1)[0] not in FINDING_KINDS:
                raise ValueError(f"ladder key {kind!r} names no finding kind; expected one of "
                                 f"{FINDING_KINDS}, optionally followed by ':cause'")
            for rung in rungs:
                for a in rung.split("+"):
                    if a == "restructure":
                        raise ValueError(f"ladder[{kind!r}]: 'restructure' is not a ladder rung; "
                                         "use Policy(structural='repair')")
                    if a not in ACTION_KINDS:
                        raise ValueError(f"ladder[{kind!r}] has unknown action {a!r}; "
                                         f"expected one of {ACTION_KINDS}")
        self.halt_on = frozenset(halt_on)
        unknown = self.halt_on - set(FINDING_KINDS)
        if unknown:
            raise ValueError(f"halt_on has unknown finding kinds {sorted(unknown)}; "
                             f"expected some of {FINDING_KINDS}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not 0 < lr_backoff < 1:
            raise ValueError(f"lr_backoff must be in (0, 1), got {lr_backoff!r}")
        if not 0 < lr_cause_backoff < 1:
            raise ValueError(f"lr_cause_backoff must be in (0, 1), got {lr_cause_backoff!r}")
        if not 0 < min_lr_scale < 1:
            raise ValueError(f"min_lr_scale must be in (0, 1), got {min_lr_scale!r}")
        if not isinstance(max_rollbacks, int) or max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be a non-negative integer, got {max_rollbacks!r}")
        if structural not in ("report", "repair"):
            raise ValueError(f"structural must be 'report' or 'repair', got {structural!r}")
        self.structural = structural
        self.ladder = merged
        self.window = window
        self.max_rollbacks = max_rollbacks
        self.lr_backoff = lr_backoff
        self.lr_cause_backoff = lr_cause_backoff
        self.min_lr_scale = min_lr_scale
        self._seen: dict[str, deque[int]] = {}

    @classmethod
    def monitor_only(cls) -> "Policy":
        """Report findings, never act (no clip, skip, backoff, rollback or halt).

        ``guard.step(loss)`` under this policy still applies the loop's own update, unchanged
        (it replaces ``optimizer.step()``); use ``guard.observe(loss)`` where the framework
        steps itself."""
        return cls({k: () for k in DEFAULT_LADDER})

    @property
    def acts(self) -> bool:
        """False for a policy that never acts (:meth:`monitor_only`): no ladder has a rung and
        nothing halts. The Guard then does not clip either (its default ``clip="adaptive"``
        becomes ``None``)."""
        return (bool(self.halt_on) or self.structural == "repair"
                or any(bool(r) for r in self.ladder.values()))

    def decide(self, findings: Sequence[Finding], step: int) -> Plan:
        plan = Plan()
        for f in findings:
            if f.kind in self.halt_on:
                plan.actions.append(("halt", f))
                continue
            key = self.ladder_key(f)
            rungs = self.ladder.get(key, ())
            if not rungs:
                continue
            seen = self._seen.setdefault(key, deque())
            while seen and seen[0] <= step - self.window:
                seen.popleft()
            seen.append(step)
            rung = rungs[min(len(seen), len(rungs)) - 1]
            if f.kind == "nonfinite" and f.origin in ("parameters", "optimizer") and "rollback" not in rung:
                rung = "rollback+lr_backoff"  # a skip cannot repair corrupted weights
            for a in rung.split("+"):
                if a not in {k for k, _ in plan.actions}:
                    plan.actions.append((a, f))
        plan.actions.sort(key=lambda af: _ORDER[af[0]])
        return plan

    def backoff_factor(self, f: Finding, repeat: int = 0) -> float:
        """The LR backoff factor for a finding: ``lr_backoff``, or, when it names the learning
        rate as its cause, ``lr_cause_backoff`` for the first such cut and its square root
        for each further one (``repeat`` = cuts already made for that cause): a search in log
        space that does not overshoot the working LR (the zoo's LSTM LM at SGD lr 100 needed
        100 -> 10 -> 3.2 on seed 1; a second 10x cut left it at lr 1, too slow to learn)."""
        cause = f.evidence.get("cause") if isinstance(f.evidence, dict) else None
        if cause != "learning_rate":
            return self.lr_backoff
        return self.lr_cause_backoff if repeat == 0 else self.lr_cause_backoff ** 0.5

    def ladder_key(self, f: Finding) -> str:
        """``"kind:cause"`` when the ladder has an entry for the finding's cause, else the kind."""
        cause = f.evidence.get("cause") if isinstance(f.evidence, dict) else None
        if isinstance(cause, str) and f"{f.kind}:{cause}" in self.ladder:
            return f"{f.kind}:{cause}"
        return f.kind

    def forget(self, kinds: Iterable[str]) -> None:
        """Forget the occurrences counted so far of these finding kinds (their ladders start
        again at the first rung): after the loss itself changed, the spikes and gradient jumps
        that marked the change say nothing about the run from then on."""
        kinds = set(kinds)
        for key in list(self._seen):
            if key.split(":", 1)[0] in kinds:
                del self._seen[key]

    def state_dict(self) -> dict:
        return {"seen": {k: list(v) for k, v in self._seen.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._seen = {k: deque(v) for k, v in state.get("seen", {}).items()}

    def describe(self) -> str:
        lines = [f"{k:<18} " + " -> ".join(v) + " (repeats)" for k, v in self.ladder.items() if v]
        if self.halt_on:
            lines.append(f"halt at once on: {', '.join(sorted(self.halt_on))}")
        lines.append(f"halt when: more than {self.max_rollbacks} rollbacks, no snapshot, "
                     f"or LR scale below {self.min_lr_scale:g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Policy(window={self.window}, max_rollbacks={self.max_rollbacks}, "
                f"lr_backoff={self.lr_backoff}, halt_on={sorted(self.halt_on)}, "
                f"structural={self.structural!r})")
