"""The decision core: StepStats in -> detectors -> policy -> a plan out, with the records.

It imports no torch (numpy only), so one core serves every training loop: the torch Guard (and
the GuardedOptimizer and framework callbacks built on it), and loops of other frameworks.

    core = DecisionCore()
    findings = core.detect(stats)            # StepStats -> findings (recorded, sent to sinks)
    plan = core.decide(findings)             # the policy's plan: [(action, finding), ...]
    core.act("skip", "nonfinite: ...")       # the caller carries it out, then records it
    core.step_count += 1

It owns what a run remembers: the findings and actions (bounded lists, unbounded counts), event
counters, the statistics history, the step counters, the chance level of the loss, the summary
and the halt story, and their ``state_dict``. Carrying a plan out (clipping gradients, LR,
rollback, the optimizer step) belongs to the framework side.
"""
from __future__ import annotations

import copy
import math
import os
import weakref
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, cast

from .detect import LOSS_DETECTORS, Detector, default_detectors
from .detect.base import ChanceAware
from .detect.progress import DivergenceDetector, PlateauDetector
from .policy import Plan, Policy
from .samples import BadBatch, SampleLedger, sorted_ids
from .sinks.base import Sink
from .types import REMEDIES, SEVERE_KINDS, Action, Finding, StepStats, TrainingUnstable

if TYPE_CHECKING:  # pragma: no cover
    from .remedies.lr import LRController


def _finding(d: dict[str, Any]) -> Finding:
    fields: dict[str, Any] = {k: (tuple(v) if k in ("locations", "remedies") else v)
                              for k, v in d.items()}
    return Finding(**fields)


def check_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


#: steps without a severe finding before the state counts as settled again: a rollback snapshot
#: is taken only then, and ``healthy`` waits for it (a severe finding answered by an LR cut alone
#: may still be playing out; 10 steps is the detectors' shortest window)
QUIET = 10


#: ``id()`` of the decision core whose front-end began a step last in this process (0: none)
_LAST_TURN = [0]
#: a core's loss is taken as coupled to another's (:meth:`DecisionCore.take_turn`) once
#: ``COUPLED_TURNS`` = 3 of its steps followed another core's step, when those are at least
#: 1 in ``COUPLED_SHARE`` = 10 of its steps since the first such step: a GAN steps its players
#: in turn (the PyTorch DCGAN example: one discriminator step per generator step; WGAN-GP:
#: 5, some recipes up to 10), while loops that run several models one after the other, or
#: benchmarks that interleave whole blocks of 20 or more steps, stay below that share
COUPLED_TURNS, COUPLED_SHARE = 3, 10

COUPLED_MESSAGE = (
    "this run's steps and another guarded run's take turns (a GAN's generator and "
    "discriminator, an actor and its critic): its loss is coupled to the other model's and "
    "need not go down, so the rules that judge its progress (plateau, slow divergence, ruin) "
    "are off; non-finite values, loss spikes, a 1e4x blow-up and gradient explosions are still "
    "judged. judge_loss=True keeps the progress rules on; judge_loss=False also drops the "
    "loss spikes and blow-ups (a policy-gradient surrogate)")


#: after a rollback that answered loss spikes (or a 1e4x blow-up), the first ``SHIFT_STEPS``
#: = 2 losses are compared with the spike: the rollback restored weights that gave a calm loss
#: (the finding's ``healthy_step``), and the first of these losses is computed at exactly
#: those weights, the second after one update at the lowered learning rate. Weights that went
#: bad give a calm loss again once restored (a corrupted weight, a bad batch, an LR too high:
#: the zoo, bench/faults.py and bench/loss_changes.py's control keep their findings and
#: actions with this test); when both stay at the spike's level, the loss moved at weights
#: that were fine before: the data or the loss function changed (a loss term switched on, a
#: new task or curriculum stage), which no rollback or learning-rate cut can undo (a VAE whose
#: KL term is switched on at step 1,000: two skips, a rollback, and three LR cuts to 3.5% of
#: its schedule before this test; a class-incremental digits run halted after 8 rollbacks)
SHIFT_STEPS = 2
#: ... "at the spike's level": above the geometric midpoint of the pre-spike median and the
#: spike (log space; the midpoint in raw units for losses that are not all positive), i.e.
#: the loss kept at least half of the jump in log terms
SHIFT_KEEP = 0.5


class _ShiftProbe:
    """A rollback for loss spikes waits on the next losses (see :data:`SHIFT_STEPS`)."""

    def __init__(self, at: int, median: float, spike: float, calm: int, to_step: int) -> None:
        self.at, self.median, self.spike, self.calm = at, median, spike, calm
        self.to_step = to_step  # the step of the restored weights
        self.losses: list[float] = []
        self.lr: tuple[Any, dict, int] | None = None  # (controller, state before the cut, cuts)

    def kept(self, loss: float) -> bool:
        """``loss`` kept at least :data:`SHIFT_KEEP` of the spike's jump."""
        med, spike = self.median, self.spike
        if med > 0 and loss > 0:
            return math.log(loss / med) > SHIFT_KEEP * math.log(spike / med)
        return loss - med > SHIFT_KEEP * (spike - med)


class DecisionCore:
    """Detectors, policy and records of one run, free of any framework.

    Args:
        policy: a :class:`Policy` (default ladders).
        detectors: detector instances (default: one per finding kind).
        sinks: listeners (console, JSONL, ...): they receive every finding, action, event and
            the sampled statistics.
        keep_records: ``findings`` / ``actions`` keep at most this many recent entries; the
            counts keep everything.
        chance_loss: ``"auto"`` (set at the first usable loss by ``infer_chance``), a positive
            number (ln V), or ``None``.
        on_action: called with every recorded :class:`Action`.
        judge_loss: ``"auto"`` (default) or ``True``: the loss's value is judged (spikes,
            progress, stalls); ``"auto"`` turns the progress rules off when the front-end
            finds the loss coupled to another model's (:meth:`couple`: a GAN's players take
            turns). ``False``: the loss is not one that should go down (a GAN player's loss, a
            policy-gradient surrogate, a loss dominated by an entropy bonus): the detectors of
            :data:`~trainguard.detect.LOSS_DETECTORS` are left out, from the default list and
            from ``detectors``; a non-finite loss is still a finding.
    """

    def __init__(self, *, policy: Policy | None = None, detectors: Sequence[Detector] | None = None,
                 sinks: Iterable[Sink] = (), keep_records: int = 10_000,
                 chance_loss: float | str | None = "auto",
                 on_action: Callable[[Action], None] | None = None,
                 judge_loss: bool | str = "auto") -> None:
        if not (judge_loss is True or judge_loss is False or judge_loss == "auto"):
            raise ValueError(f"judge_loss must be True, False or 'auto', got {judge_loss!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a trainguard.Policy, got {type(policy).__name__}")
        if not (chance_loss is None or chance_loss == "auto" or (
                isinstance(chance_loss, (int, float)) and not isinstance(chance_loss, bool)
                and math.isfinite(chance_loss) and chance_loss > 0)):
            raise ValueError(f"chance_loss must be 'auto', None or a positive number (ln V), "
                             f"got {chance_loss!r}")
        self.policy = policy if policy is not None else Policy()
        self.detectors = list(detectors) if detectors is not None else default_detectors()
        self.judge_loss = judge_loss
        if judge_loss is False:
            self.detectors = [d for d in self.detectors if not isinstance(d, LOSS_DETECTORS)]
        #: the loss was found coupled to another model's (``judge_loss="auto"``, :meth:`couple`)
        self.coupled = False
        self._turns = 0
        self._first_turn = 0
        # the detectors called on a plain step (see Detector.sampled), rebuilt when the list
        # changes
        self._every_src: list[Detector] = []
        self._every: list[Detector] = []
        # each detector's state as built: forget_detectors() returns them to it
        self._fresh = [copy.deepcopy(d.state_dict()) for d in self.detectors]
        self.sinks: list[Sink] = list(sinks)
        self.keep_records = check_int("keep_records", keep_records)
        self.on_action = on_action
        self.findings: list[Finding] = []
        self.actions: list[Action] = []
        self.finding_counts: Counter[str] = Counter()
        self.action_counts: Counter[str] = Counter()
        self.first: dict[str, Finding | Action] = {}  # "finding:kind" / "action:kind" -> first
        self.history: deque[StepStats] = deque(maxlen=2000)
        self.counts: Counter[str] = Counter()
        self.step_count = 0
        self.applied_steps = 0
        self.rollbacks = 0
        #: rollbacks made before the last structural rescue: the budget restarts with the new
        #: structure (``Policy(structural="repair")``)
        self.rollback_base = 0
        self.last_severe = -10**9
        #: the last step with a severe finding the plan did not answer by skipping the update or
        #: rolling back (the update went on: monitor-only, observe mode, an LR cut alone)
        self.unresolved = -10**9
        #: the newest step whose state (weights, optimizer state, buffers) was checked and found
        #: good with no unresolved severe finding; -1 before any check
        self.last_good_step = -1
        self.halted = False
        self.halt_story = ""
        #: the HTML run report written at the end (the front-end's ``report=``), named last in
        #: the summary
        self.report_path: str | None = None
        self.chance_option = chance_loss
        self.chance_loss: float | None = None  # the level in use
        #: the sample ids shown with each step, and the bad batches they named
        #: (:mod:`trainguard.samples`)
        self.samples = SampleLedger()
        self._chance_asked = chance_loss  # the option as given (loss_changed() asks again)
        if isinstance(chance_loss, (int, float)):
            self.set_chance(float(chance_loss))
        #: a rollback for loss spikes waiting on the next losses (:data:`SHIFT_STEPS`)
        self._shift: _ShiftProbe | None = None
        #: called when the loss changed (:meth:`loss_changed`): a front-end forgets what it
        #: learnt of the old loss (the torch Guard: the loss's kind, read from its graph; every
        #: front-end: the adaptive clip's last norm, see ``AdaptiveClip.rebase``)
        self.on_loss_changed: list[Callable[[], None]] = []

    # -- decisions ---------------------------------------------------------------------------
    def run(self, stats: StepStats, *, infer_chance: Callable[[float], float | None] | None = None,
            refine: Callable[[list[Finding], StepStats], list[Finding]] | None = None,
            plan: bool = True) -> tuple[list[Finding], Plan, bool]:
        """The one decision loop every mode shares: detectors, the locate hook (``refine``), the
        records and sinks, the policy. Dated with ``stats.step``. Returns (findings, plan,
        severe); ``plan=False`` (observe-only) records and reports but plans nothing."""
        if self._shift is not None and stats.step > self._shift.at:
            self._judge_shift(stats)
        findings = self.detect(stats, infer_chance)
        if stats.scaler_overflow and not any(f.kind == "nonfinite" for f in findings):
            self.event("scaler_overflow", step=stats.step, loss_scale=stats.loss_scale)
        if refine is not None:
            findings = refine(findings, stats)
        bad = self.samples.judge(stats.step, findings) if self.samples.pending else None
        for f in findings:
            self.emit(f)
        severe = any(f.severe for f in findings)
        if plan:
            out = self.decide(findings, stats.step)
        else:
            out = Plan()
            if severe:
                self.last_severe = stats.step
        if severe and not out.kinds() & {"skip", "rollback", "halt"}:
            self.unresolved = stats.step
        if bad is not None:
            self.bad_batch(bad, out)
        return findings, out, severe

    def offer_samples(self, step: int, ids: Any, losses: Any = None, loss: Any = None) -> None:
        """The sample ids (and optionally per-sample losses, and the micro-batch's own loss) of
        one micro-batch of ``step``: held by reference, read only if the step is judged bad
        (see :mod:`trainguard.samples`)."""
        self.samples.offer(step, ids, losses, loss)

    def bad_batch(self, bad: BadBatch, plan: Plan) -> None:
        """Record a bad batch with the actions planned for it, and tell the sinks."""
        bad.actions = tuple(sorted(plan.kinds()))
        self.samples.record(bad)
        ev = bad.to_dict()
        ev.pop("step")
        self.event("bad_batch", step=bad.step, message=bad.describe(), **ev)

    def settled(self, step: int | None = None) -> bool:
        """Not halted, and no severe finding left unanswered (the update applied anyway) in the
        last :data:`QUIET` steps: the same quiet period a rollback snapshot waits for."""
        at = self.step_count if step is None else step
        return not self.halted and at - self.unresolved > QUIET

    def good_state(self, step: int) -> None:
        """The state at ``step`` was checked and found good: the newest good step."""
        if self.settled(step):
            self.last_good_step = max(self.last_good_step, step)

    def detect(self, stats: StepStats,
               infer_chance: Callable[[float], float | None] | None = None) -> list[Finding]:
        """Every detector over one step's statistics (the chance level is fixed first)."""
        if self.chance_option == "auto" and self.chance_loss is None and stats.loss_usable:
            self.chance_option = None  # decided once, at the first usable loss
            self.set_chance(infer_chance(stats.loss) if infer_chance is not None else None)
        dets = self.detectors
        if stats.activations is None and stats.optimizer_state is None \
                and stats.output_log_z is None:  # a plain step: the sampled-only rules rest
            if self._every_src != dets:
                self._every_src = list(dets)
                self._every = [d for d in dets if getattr(d, "sampled", None) is None]
            dets = self._every
        return [f for d in dets for f in d.update(stats)]

    def decide(self, findings: Sequence[Finding], step: int | None = None) -> Plan:
        """The policy's plan for these findings (and the bookkeeping of severe steps)."""
        step = self.step_count if step is None else step
        if any(f.severe for f in findings):
            self.last_severe = step
        return self.policy.decide(findings, step)

    def take_turn(self) -> None:
        """A front-end begins a step (the step ``step_count``): when another core's step ran
        since this one's last, count a turn, and after :data:`COUPLED_TURNS` of them at a share
        of at least 1 in :data:`COUPLED_SHARE` of the steps, :meth:`couple`. A plain test of
        one integer on a step that follows this core's own."""
        me = id(self)
        last = _LAST_TURN[0]
        if last == me:
            return
        _LAST_TURN[0] = me
        step = self.step_count
        if last == 0 or step == 0 or self.coupled or self.judge_loss != "auto":
            return
        if self._turns == 0:
            self._first_turn = step
        self._turns += 1
        if (self._turns >= COUPLED_TURNS
                and COUPLED_SHARE * self._turns >= step - self._first_turn + 1):
            self.couple(COUPLED_MESSAGE, step)

    def couple(self, why: str, step: int | None = None) -> bool:
        """The loss is coupled to another model's (a GAN's discriminator and generator, an
        actor and its critic, each stepped in turn): it need not go down, so the rules that
        judge its progress rest (divergence's slow and ruin rules; plateau), while its
        non-finite values, spikes and the 1e4x blow-up are still judged. Only under
        ``judge_loss="auto"``, once; an event with ``why`` tells the sinks. Returns whether it
        changed anything."""
        if self.judge_loss != "auto" or self.coupled:
            return False
        self.coupled = True
        for d in self.detectors:
            if isinstance(d, DivergenceDetector):
                d.progress = False
        kept = [(d, f) for d, f in zip(self.detectors, self._fresh)
                if not isinstance(d, PlateauDetector)]
        self.detectors = [d for d, _ in kept]
        self._fresh = [f for _, f in kept]
        if why:
            self.event("coupled_losses", step=step, message=why)
        return True

    def set_chance(self, level: float | None) -> None:
        self.chance_loss = level
        if level is None:
            return
        for d in self.detectors:
            setter = getattr(d, "set_chance", None)
            if setter is not None:
                setter(level)

    # -- the late remedies' bookkeeping, shared by every executor (torch, Keras, NumPy) --------
    def backoff_lr(self, f: Finding, lr: "LRController", step: int) -> None:
        """Cut the LR scale for finding ``f`` (10x then sqrt(10) per repeat when it names the
        learning rate as its cause; no regrowth then), or halt when the floor is reached."""
        lr_cause = f.evidence.get("cause") == "learning_rate"
        probe = self._shift
        if probe is not None and probe.at == step and probe.lr is None:
            probe.lr = (lr, lr.state_dict(), self.counts["lr_cause_cuts"])  # undone on a shift
        factor = self.policy.backoff_factor(f, repeat=self.counts["lr_cause_cuts"])
        if not lr.can_backoff(factor):
            raise self.halt(f"the learning rate is already down to {lr.scale:.3g} of its schedule "
                            f"(policy.min_lr_scale={self.policy.min_lr_scale:g})", f, lr.scale,
                            step)
        if lr_cause:
            self.counts["lr_cause_cuts"] += 1
        was, now = lr.backoff(factor, recover=not lr_cause)
        self.act("lr_backoff", f"{f.kind}: learning-rate scale {was:.3g} -> {now:.3g}", step=step,
                 before=was, after=now, finding=f.kind)

    def clip_scale(self, clipper: Any, f: Finding | None, norm: float, step: int) -> float:
        """The factor (<= 1) to scale this step's gradients by: the clipper's own threshold,
        or twice the recent median norm when a finding asked for a clip; records the action."""
        if not math.isfinite(norm):
            return 1.0
        thr, reason = math.inf, ""
        if clipper is not None and getattr(clipper, "name", "") != "agc":
            coef = clipper.coefficient(norm)
            if coef < 1.0:
                thr, reason = norm * coef, f"{clipper.name} clipping"
        if f is not None:
            ref = f.evidence.get("median")
            if isinstance(ref, (int, float)) and ref > 0 and 2 * ref < thr:
                thr, reason = 2 * ref, f"{f.kind}: clipped to 2x the median norm"
        if thr < norm:
            self.act("clip", f"{reason}: gradient norm {norm:.4g} -> {thr:.4g}", step=step,
                     norm=norm, threshold=thr)
            return thr / (norm + 1e-6)
        return 1.0

    def check_rollback(self, f: Finding, have_snapshot: bool, lr_scale: float, step: int) -> None:
        """Raise the halt when a rollback cannot help: no snapshot, or too many already."""
        if not have_snapshot:
            raise self.halt("a rollback was needed but no snapshot is held", f, lr_scale, step)
        if self.rollbacks - self.rollback_base >= self.policy.max_rollbacks:
            raise self.halt(f"{self.rollbacks} rollbacks did not stabilise the run "
                            f"(policy.max_rollbacks={self.policy.max_rollbacks})", f, lr_scale,
                            step)

    def rolled_back(self, f: Finding, step: int, to_step: int, what: str) -> None:
        """Record a rollback the executor just carried out; the detectors start afresh."""
        self.rollbacks += 1
        self.reset_detectors()
        self.act("rollback", f"{f.kind}: {what}", step=step, to_step=to_step, finding=f.kind)
        self._shift = None
        ev = f.evidence if isinstance(f.evidence, dict) else {}
        calm, spike = ev.get("healthy_step"), ev.get("loss")
        if f.kind == "loss_spike":
            med = ev.get("median")  # the window's median before the spike
        elif f.kind == "divergence" and ev.get("trigger") == "fast" and ev.get("losses"):
            med = ev["losses"][0]  # the low point the blow-up started from
        else:
            return
        if (isinstance(calm, int) and to_step <= calm
                and isinstance(med, (int, float)) and isinstance(spike, (int, float))
                and math.isfinite(med) and math.isfinite(spike) and spike > med):
            self._shift = _ShiftProbe(step, float(med), float(spike), calm, to_step)

    def _judge_shift(self, stats: StepStats) -> None:
        """A step after a rollback for loss spikes or a blow-up (:data:`SHIFT_STEPS`): the loss
        at the restored weights either came back down (the probe ends: the weights were the
        cause) or stayed at the spike's level, and then the loss itself changed:
        :meth:`loss_changed`, and the learning-rate cut made with the rollback is undone."""
        probe = self._shift
        assert probe is not None
        if not stats.loss_usable or stats.scaler_overflow or not probe.kept(stats.loss):
            self._shift = None
            return
        probe.losses.append(stats.loss)
        if len(probe.losses) < SHIFT_STEPS:
            return
        self._shift = None
        undone = ""
        if probe.lr is not None:
            lr, before, cuts = probe.lr
            was = lr.scale
            lr.load_state_dict(before)
            self.counts["lr_cause_cuts"] = cuts
            undone = (f"; the learning-rate cut made with the rollback is undone "
                      f"(scale {was:.3g} -> {lr.scale:.3g})")
        lo = min(probe.losses)
        why = (f"the loss stayed at {lo:.4g} and above ({lo / probe.median:.1f}x the median "
               f"{probe.median:.4g} before step {probe.calm + 1})" if probe.median > 0 else
               f"the loss stayed at {lo:.4g} and above (the median was {probe.median:.4g} before "
               f"step {probe.calm + 1})")
        self.loss_changed(
            f"loss changed: {why} at the weights of step {probe.to_step}, restored at step "
            f"{probe.at}, which gave a calm loss then: the data or the loss function changed, "
            f"not the model (a loss term switched on, a new task or stage); the loss rules "
            f"start again from this level{undone}. If neither was meant to change, inspect "
            f"the batches from step {probe.calm + 1} on", step=stats.step, by="guard")

    def loss_changed(self, reason: str = "", step: int | None = None, *,
                     by: str = "user") -> None:
        """The loss's definition changed (a loss term switched on or reweighted, a new task,
        dataset or curriculum stage): the detectors that judge the loss's value
        (:data:`~trainguard.detect.LOSS_DETECTORS`) and the gradient-explosion detector (the
        gradients change scale with the loss) start over as built, from the next step; the
        policy forgets the loss spikes and gradient jumps counted so far; a chance level found
        automatically is looked for again; the front-ends' hooks (:attr:`on_loss_changed`)
        run. Weights, optimizer state, snapshots, the LR
        scale and the records are kept. A ``loss_changed`` event (``by``: "user", or "guard"
        when the core found it, see :data:`SHIFT_STEPS`) tells the sinks."""
        self.forget_detectors({d.kind for d in self.detectors if isinstance(d, LOSS_DETECTORS)}
                              | {"grad_explosion"})
        self.policy.forget({"loss_spike", "grad_explosion"})
        self._shift = None
        asked = self._chance_asked
        if asked == "auto":
            self.chance_option, self.chance_loss = "auto", None
            for d in self.detectors:
                if isinstance(d, ChanceAware):
                    d.set_chance(None)
        elif isinstance(asked, (int, float)):
            self.set_chance(float(asked))
        for hook in self.on_loss_changed:
            hook()
        at = self.step_count if step is None else step
        msg = reason or "the loss changed (told by the training loop): the loss rules start again"
        self.event("loss_changed", step=at, by=by, message=msg)

    def forget_detectors(self, kinds: Iterable[str]) -> None:
        """The detectors of these finding kinds start over as built (after a structural repair:
        what they saw, and what they already reported, describes the old structure)."""
        kinds = set(kinds)
        for d, fresh in zip(self.detectors, self._fresh):
            if getattr(d, "kind", None) in kinds:
                d.load_state_dict(copy.deepcopy(fresh))

    def reset_detectors(self) -> None:
        """After a rollback: the windows describe the abandoned trajectory."""
        for d in self.detectors:
            d.reset()

    # -- records -----------------------------------------------------------------------------
    def _record(self, items: list, item: Any, counts: Counter, tag: str) -> None:
        counts[item.kind] += 1
        self.first.setdefault(f"{tag}:{item.kind}", item)
        items.append(item)
        if len(items) > self.keep_records + self.keep_records // 10 + 1:
            del items[:len(items) - self.keep_records]  # amortised: trims every ~10% growth

    def emit(self, f: Finding) -> None:
        self._record(self.findings, f, self.finding_counts, "finding")
        for s in self.sinks:
            s.on_finding(f)

    def act(self, kind: str, reason: str, step: int | None = None, **detail: Any) -> Action:
        a = Action(kind=kind, step=self.step_count if step is None else step, reason=reason,
                   detail=detail)
        self._record(self.actions, a, self.action_counts, "action")
        for s in self.sinks:
            s.on_action(a)
        if self.on_action is not None:
            self.on_action(a)
        return a

    def event(self, kind: str, step: int | None = None, **data: Any) -> None:
        self.counts[kind] += 1
        for s in self.sinks:
            s.on_event(kind, self.step_count if step is None else step, data)

    def stats(self, stats: StepStats) -> None:
        for s in self.sinks:
            s.on_stats(stats)

    # -- words -------------------------------------------------------------------------------
    def summary(self, lr_scale: float = 1.0) -> str:
        """A human-readable account of the run so far."""
        lines = [f"trainguard summary: {self.step_count} steps, {self.applied_steps} updates applied"]
        if not self.finding_counts and not self.action_counts:
            lines.append("  no findings, no interventions")
        by_kind: dict[str, list[Finding]] = {}
        for f in self.findings:
            by_kind.setdefault(f.kind, []).append(f)
        for kind, n in self.finding_counts.items():
            first = cast(Finding, self.first[f"finding:{kind}"])
            wheres = sorted({f.where for f in by_kind.get(kind, []) + [first] if f.where})
            at = f" at {', '.join(wheres[:3])}" + (" ..." if len(wheres) > 3 else "") if wheres else ""
            lines.append(f"  finding {kind}: {n}x, first at step {first.step}{at}")
            lines.append(f"    {first.message}")
        for kind, n in self.action_counts.items():
            first_action = cast(Action, self.first[f"action:{kind}"])
            lines.append(f"  action {kind}: {n}x, first at step {first_action.step} "
                         f"({first_action.reason})")
        if self.counts.get("scaler_overflow"):
            lines.append(f"  fp16 loss-scaler overflow skips (normal, not instability): "
                         f"{self.counts['scaler_overflow']}")
        if self.samples.count:
            sus = sorted_ids(self.samples.suspects)
            file = f"; listed in {self.samples.path}" if self.samples.path else ""
            lines.append(f"  bad batches: {self.samples.count}, suspect samples "
                         f"{sus[:10]}{' ...' if len(sus) > 10 else ''}{file}")
        if lr_scale != 1.0:
            lines.append(f"  learning-rate scale now {lr_scale:.3g} of the schedule")
        kinds = [k for k in self.finding_counts if k in SEVERE_KINDS or k == "plateau"]
        if kinds:
            lines.append("  what to change:")
            for k in kinds:
                # the first finding's own advice (a plateau with large updates says to lower
                # the learning rate, not the kind's default "raise it")
                first_f = self.first.get(f"finding:{k}")
                advice = first_f.remedies if isinstance(first_f, Finding) and first_f.remedies \
                    else REMEDIES.get(k, ())
                for r in advice[:2]:
                    lines.append(f"    - ({k}) {r}")
        if self.report_path:
            lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)

    def story(self, reason: str, finding: Finding | None, lr_scale: float = 1.0,
              step: int | None = None) -> str:
        """The explanation a halt carries: what happened, what was tried, what to change."""
        at = self.step_count if step is None else step
        lines = [f"trainguard halted training at step {at}: {reason}."]
        if finding is not None:
            where = f" in {finding.where}" if finding.where else ""
            lines.append(f"What happened: {finding.kind}{where}: {finding.message}")
        kinds = self.finding_counts
        if kinds:
            lines.append("Findings so far: " + ", ".join(f"{k} x{n}" for k, n in kinds.items()))
        acts = Counter({k: n for k, n in self.action_counts.items() if k != "halt"})
        if acts:
            lines.append("Repairs tried: " + ", ".join(f"{k} x{n}" for k, n in acts.items())
                         + f"; learning-rate scale reached {lr_scale:.3g}")
        kind = finding.kind if finding is not None else None
        rem = finding.remedies if finding is not None else REMEDIES.get(kind or "", ())
        if rem:
            lines.append("What to change:")
            lines.extend(f"  - {r}" for r in rem)
        return "\n".join(lines)

    def halt(self, reason: str, finding: Finding | None, lr_scale: float = 1.0,
             step: int | None = None) -> TrainingUnstable:
        """Record the halt, close the sinks, and return the exception to raise."""
        self.act("halt", reason, step=step)
        self.halted = True
        story = self.halt_story = self.story(reason, finding, lr_scale, step)
        self.event("story", step=step, text=story)
        self.close(self.summary(lr_scale))
        return TrainingUnstable(story, self.findings, self.actions)

    def close(self, text: str) -> None:
        for s in self.sinks:
            s.close(text)

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only."""
        return {
            "version": 1,
            "step_count": self.step_count, "applied_steps": self.applied_steps,
            "rollbacks": self.rollbacks, "rollback_base": self.rollback_base,
            "counts": dict(self.counts),
            "chance_loss": self.chance_loss, "last_good_step": self.last_good_step,
            "coupled": self.coupled,
            "detectors": [{"type": type(d).__name__, "state": d.state_dict()} for d in self.detectors],
            "policy": self.policy.state_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "actions": [a.to_dict() for a in self.actions],
            "finding_counts": dict(self.finding_counts),
            "action_counts": dict(self.action_counts),
            "first": {k: v.to_dict() for k, v in self.first.items()},
            "bad_batches": self.samples.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Not atomic on its own: callers keep a backup (see ``Guard.load_state_dict``)."""
        self.step_count = state["step_count"]
        self.applied_steps = state["applied_steps"]
        self.rollbacks = state["rollbacks"]
        self.rollback_base = int(state.get("rollback_base", 0))
        self.counts = Counter(state.get("counts", {}))
        self.last_good_step = int(state.get("last_good_step", -1))
        if self.step_count > 0 and self.chance_option == "auto":
            self.chance_option = None  # decided by the run that saved this state
            self.set_chance(state.get("chance_loss"))
        if state.get("coupled"):
            self.couple("")  # the saved run's losses were coupled (its log told it then)
        saved = state["detectors"]
        for d in self.detectors:
            match = next((s for s in saved if s["type"] == type(d).__name__), None)
            if match is not None:
                d.load_state_dict(match["state"])
        self.policy.load_state_dict(state["policy"])
        self.findings = [_finding(f) for f in state.get("findings", [])]
        self.samples.load_state_dict(state.get("bad_batches") or {})
        self.actions = [Action(**a) for a in state.get("actions", [])]
        self.finding_counts = Counter(state.get("finding_counts") or
                                      Counter(f.kind for f in self.findings))
        self.action_counts = Counter(state.get("action_counts") or
                                     Counter(a.kind for a in self.actions))
        self.first = {k: (_finding(v) if k.startswith("finding:") else Action(**v))
                      for k, v in (state.get("first") or {}).items()}
        for f in self.findings:
            self.first.setdefault(f"finding:{f.kind}", f)
        for a in self.actions:
            self.first.setdefault(f"action:{a.kind}", a)


def calm_limit(f: Finding, step: int) -> int:
    """The newest step whose state a rollback at ``step`` for finding ``f`` may restore: the
    step before, or the finding's ``healthy_step`` (the last step a detector saw calm, before
    a spike or a blow-up began, or before units were killed) when that is earlier."""
    healthy = f.evidence.get("healthy_step") if isinstance(f.evidence, dict) else None
    if isinstance(healthy, int) and not isinstance(healthy, bool) and 0 <= healthy < step - 1:
        return healthy
    return step - 1


def weak_call(obj: Any, method: str) -> Callable[[], None]:
    """``obj.method()`` through a weak reference: a core's hook must not keep its front-end
    alive (the front-end owns the core)."""
    ref = weakref.ref(obj)

    def call() -> None:
        o = ref()
        if o is not None:
            getattr(o, method)()
    return call


class CoreView:
    """What every front-end (the torch Guard, the Keras Guard, the Monitor) shows of its
    :class:`DecisionCore` (``self.core``) and LR controller (``self.lr``), read-only."""

    core: DecisionCore
    lr: "LRController"

    def _init_core(self, *, policy: Policy | None, detectors: Sequence[Detector] | None,
                   clip: Any, console: bool, log: str | None, sinks: Iterable[Sink],
                   keep_records: int, chance_loss: Any, who: str,
                   judge_loss: bool | str = "auto") -> None:
        """The core, the clipper and the LR controller of a front-end without torch-side
        clipping (the Monitor, the Keras Guard): ``clip='agc'`` needs layer structure."""
        from .remedies.clip import AGC, make_clipper
        from .remedies.lr import LRController
        from .report import build_sinks
        self.core = DecisionCore(policy=policy, detectors=detectors,
                                 sinks=build_sinks(console, log, sinks),
                                 keep_records=keep_records, chance_loss=chance_loss,
                                 judge_loss=judge_loss)
        if clip == "adaptive" and not self.core.policy.acts:
            clip = None  # a policy that never acts does not clip by default either
        self.clipper = make_clipper(clip)
        if isinstance(self.clipper, AGC):
            raise ValueError(f"{who} does not support clip='agc' (unit-wise clipping needs the "
                             "layer structure); use 'adaptive', a number or None")
        self.lr = LRController(factor=self.core.policy.lr_backoff,
                               min_scale=self.core.policy.min_lr_scale)
        self.core.on_loss_changed.append(weak_call(self, "_rebase_clip"))

    def _rebase_clip(self) -> None:
        """The loss changed: the next gradient norm is not a jump for the adaptive clip."""
        rebase = getattr(self.clipper, "rebase", None)
        if rebase is not None:
            rebase()

    policy = property(lambda self: self.core.policy)
    detectors = property(lambda self: self.core.detectors)
    sinks = property(lambda self: self.core.sinks)
    findings = property(lambda self: self.core.findings)
    actions = property(lambda self: self.core.actions)
    finding_counts = property(lambda self: self.core.finding_counts)
    action_counts = property(lambda self: self.core.action_counts)
    history = property(lambda self: self.core.history)
    counts = property(lambda self: self.core.counts)
    keep_records = property(lambda self: self.core.keep_records)
    chance_loss = property(lambda self: self.core.chance_loss,
                           doc="The chance level (ln V) in use, or None.")
    step_count = property(lambda self: self.core.step_count, doc="Steps taken so far.")
    applied_steps = property(lambda self: self.core.applied_steps, doc="Updates applied so far.")
    rollbacks = property(lambda self: self.core.rollbacks, doc="Rollbacks so far.")
    bad_batches = property(lambda self: list(self.core.samples.batches),
                           doc="The steps judged bad with the sample ids they trained on "
                               "(:class:`trainguard.samples.BadBatch`; the most recent 1,000), "
                               "for loops that pass ``sample_ids``.")
    last_good_step = property(lambda self: self.core.last_good_step,
                              doc="The newest step whose state was checked and found good (no "
                                  "non-finite or huge weights, optimizer state or buffers, no "
                                  "unresolved severe finding); -1 before any check.")

    @property
    def healthy(self) -> bool:
        """True when the state is good to save: not halted, no severe finding left unanswered
        in the last 10 steps, and the last measured state (weights, optimizer state, buffers)
        finite. The torch Guard reads the state itself when asked."""
        if not self.core.settled():
            return False
        last = self.core.history[-1] if self.core.history else None
        return last is None or (last.params_finite and not last.huge_param_modules
                                and not last.nonfinite_optimizer_modules
                                and not last.nonfinite_buffers)

    @property
    def lr_scale(self) -> float:
        """The current learning-rate multiplier (1.0 = the scheduled LR)."""
        return self.lr.scale

    def loss_changed(self, reason: str = "") -> None:
        """Tell the guard that the loss's definition changes from the next step on (a loss term
        switched on or reweighted, a KL weight raised, a new task, dataset or curriculum
        stage): the loss rules (spike, divergence, plateau) start again from the new level
        instead of taking the jump for a failure. ``reason`` is quoted in the
        ``loss_changed`` event. Weights, optimizer state, snapshots and the LR scale are kept.
        (Without this call, a jump that persists at weights restored by a rollback is found
        to be such a change, a few steps later: :data:`trainguard.core.SHIFT_STEPS`.)"""
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a string, got {type(reason).__name__}")
        self.core.loss_changed(reason)

    def summary(self) -> str:
        """A human-readable account of the run so far."""
        return self.core.summary(self.lr.scale)

    def save_html(self, path: str | os.PathLike, title: str | None = None) -> str:
        """Write the HTML run report (:mod:`trainguard.report.html`): from the JSONL log when
        the run has one (every event), else from memory (the last 2,000 steps). Returns the
        path."""
        from .report.html import save_report
        return save_report(self, path, title)
