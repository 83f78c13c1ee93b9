"""The executor: carries out a plan on the torch side (halt, rollback, LR backoff, skip, clip, the
optimizer step), with the GradScaler's bookkeeping. It decides nothing: the plan comes from the
:class:`~trainguard.core.DecisionCore`, and every action is recorded there, dated with the step it
is about (``step=``), so the deferred mode (which acts on a step a few steps late) uses the same
code.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, NoReturn

import torch

from ..core import QUIET, DecisionCore, calm_limit
from ..measure import HUGE_STATE, HUGE_WEIGHT, StepProbe, scaler_enabled, scaler_stage_ready
from ..policy import Plan, Policy
from ..types import Finding, StepStats, TrainingUnstable
from .clip import AGC, scale_grads
from .lr import LRController
from .snapshot import SnapshotStore


CLOSURE_NEEDED = ("{0}.step needs a closure (it evaluates the loss several times per step): "
                  "call guard.step(closure=closure), or opt.step(closure) on a "
                  "GuardedOptimizer, where closure() zeroes the gradients, computes the loss, "
                  "calls backward and returns the loss")


def needs_closure(optimizer: Any) -> bool:
    """True when ``optimizer.step`` has a required ``closure`` argument (``torch.optim.LBFGS``);
    the others take an optional one."""
    try:
        p = inspect.signature(type(optimizer).step).parameters.get("closure")
    except (TypeError, ValueError):  # pragma: no cover - a step without a signature
        return False
    return p is not None and p.default is inspect.Parameter.empty


class ReuseFirst:
    """The closure handed to an optimizer that needs one: its first call returns the loss the
    Guard already measured (the gradients, clipped if the Guard clipped them, are in
    ``.grad``); every later call runs the user's closure with autograd on."""

    def __init__(self, first: Any, closure: Callable[[], Any]) -> None:
        self.first, self.closure, self.used = first, closure, False

    def __call__(self) -> Any:
        if not self.used:
            self.used = True
            return self.first
        with torch.enable_grad():
            return self.closure()


class Executor:
    """Carries out plans for one optimizer (see the module docstring).

    ``on_halt`` runs before :class:`~trainguard.TrainingUnstable` is raised (the Guard removes its
    hooks there). ``outside``: the framework takes the optimizer step itself right after
    (``Guard.decide_step``): the executor then never steps the optimizer nor touches the scaler's
    protocol, and ``applying()`` puts the LR scale in force around the framework's step.
    """

    def __init__(self, core: DecisionCore, measure: StepProbe, optimizer: torch.optim.Optimizer,
                 *, scaler: Any, scheduler: Any, clipper: Any, lr: LRController,
                 snapshots: SnapshotStore, loopcheck: Any, log_every: int,
                 on_halt: Callable[[], None], checkpoints: Any = None) -> None:
        self.core, self.measure, self.optimizer = core, measure, optimizer
        self.scaler, self.scheduler, self.clipper = scaler, scheduler, clipper
        self.lr, self.snapshots, self.loopcheck = lr, snapshots, loopcheck
        self.log_every = log_every
        self.on_halt = on_halt
        self.checkpoints = checkpoints  # a CheckpointStore: rollbacks beyond the snapshots
        self.outside = False
        #: fp32 master weights the Guard keeps for 16-bit parameters (a structural repair)
        self.master: Any = None
        #: called before a halt for exhausted rollbacks (Policy(structural="repair")): True
        #: when a structural change was made instead
        self.rescue: Callable[[Finding, int], bool] | None = None
        #: the optimizer's ``step`` requires a closure (LBFGS: it evaluates the loss several
        #: times per step); the Guard puts this step's closure in :attr:`closure`
        self.needs_closure = needs_closure(optimizer)
        self.closure: Callable[[], Any] | None = None

    @property
    def policy(self) -> Policy:
        return self.core.policy

    # -- the GradScaler ---------------------------------------------------------------------
    def scaler_ready(self) -> bool:
        """Unscale the gradients if the user has not; False if there is no enabled scaler."""
        sc = self.scaler
        if not scaler_enabled(sc):
            return False
        if scaler_stage_ready(sc, self.optimizer):
            sc.unscale_(self.optimizer)
        return True

    def scale_divisor(self) -> float | None:
        """Observe-only: the loss scale still in the gradients (never unscale them)."""
        sc = self.scaler
        if scaler_enabled(sc) and scaler_stage_ready(sc, self.optimizer):
            return float(sc.get_scale())
        return None

    def finish_scaler_step(self, scaled: bool) -> None:
        """Close the scaler's per-step bookkeeping when no optimizer step is taken (the
        framework does it when it owns the step)."""
        if scaled and not self.outside:
            self.scaler.update()

    def current_lr(self) -> float | None:
        try:
            lr = self.optimizer.param_groups[0]["lr"]
            return float(lr) * self.lr.scale
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    # -- the plan ---------------------------------------------------------------------------
    def halt(self, reason: str, finding: Finding | None, step: int | None = None) -> NoReturn:
        err = self.core.halt(reason, finding, self.lr.scale, step)
        self.on_halt()
        raise err

    def _checked(self, fn: Callable[[], None]) -> None:
        """Run a core bookkeeping call that may raise the halt; remove the hooks first."""
        try:
            fn()
        except TrainingUnstable:
            self.on_halt()
            raise

    def late(self, plan: Plan, step: int, scaled: bool) -> bool:
        """halt, rollback and lr_backoff (what can still be done a few steps late); True when
        the step's update must not be applied."""
        if not plan.actions:
            return False  # the common step: nothing planned
        kinds = plan.kinds()
        by = dict(plan.actions)
        core = self.core
        if "halt" in kinds:
            f = by["halt"]
            self.halt(f"{f.kind} is configured to halt the run (policy.halt_on)", f, step)
        skip = False
        if "rollback" in kinds:
            f = by["rollback"]
            healthy = f.evidence.get("healthy_step") if isinstance(f.evidence, dict) else None
            snap = self.snapshots.choose(before_step=step - 1, healthy=healthy)
            limit = calm_limit(f, step)
            disk = None
            if self.checkpoints is not None and (snap is None or snap.step > limit):
                disk = self.checkpoints.newest(at_or_before=limit)
            have = snap is not None or disk is not None
            if not have or core.rollbacks - core.rollback_base >= self.policy.max_rollbacks:
                self.finish_scaler_step(scaled)
                if self.rescue is not None and snap is not None:
                    # the newest good weights first, then the structural change on them
                    self.snapshots.restore(snap, at_step=step)
                    if self.rescue(f, step):
                        return True  # a structural change instead of the halt: no update
                self._checked(lambda: core.check_rollback(f, have, self.lr.scale, step))
            self.finish_scaler_step(scaled)
            scaled = False
            what = ""
            if disk is not None:
                try:
                    self.snapshots.restore_checkpoint(disk[1], disk[0], at_step=step)
                    to_step = disk[0]
                    what = (f"restored the checkpoint of step {disk[0]} from {disk[1]} (no "
                            "in-memory snapshot old enough)")
                except ValueError as e:
                    core.event("checkpoint_unusable", step=step, path=disk[1], error=str(e))
                    if snap is None:
                        self._checked(lambda: core.check_rollback(f, False, self.lr.scale, step))
            if not what:
                assert snap is not None
                self.snapshots.restore(snap, at_step=step)
                to_step, what = snap.step, f"restored the snapshot of step {snap.step}"
            self.measure.watch(step)  # probe the restored weights on the next step, then often
            core.rolled_back(f, step, to_step, what)
            skip = True
        if "lr_backoff" in kinds:
            f = by["lr_backoff"]
            if not self.lr.can_backoff(self.policy.backoff_factor(f, core.counts["lr_cause_cuts"])):
                self.finish_scaler_step(scaled)
            self._checked(lambda: core.backoff_lr(f, self.lr, step))
        return skip

    def execute(self, plan: Plan, stats: StepStats, grads: list[torch.Tensor], scaled: bool,
                step: int) -> bool:
        """The whole plan of a step measured now; returns whether the update was applied."""
        if self.late(plan, step, scaled):
            return False
        by = dict(plan.actions)
        if "skip" in by:
            f = by["skip"]
            if not stats.scaler_overflow:  # else the scaler skips by itself below
                self.finish_scaler_step(scaled)
                running = self.measure.running
                if running:
                    running.restore()  # the skipped batch's forward leaves no trace
                self.core.act("skip", f"{f.kind}: update not applied (parameters, optimizer "
                                      "moments and step counters untouched"
                              + ("; normalisation running statistics restored" if running else "")
                              + ")", step=step, finding=f.kind)
                return False
        self.clip(plan, stats, grads, step)
        return self.apply(scaled, stats)

    def clip(self, plan: Plan, stats: StepStats, grads: list[torch.Tensor], step: int) -> None:
        if not stats.grads_finite:
            return
        clipper = self.clipper
        if isinstance(clipper, AGC):
            n = clipper.apply(self.measure.probe.params)
            if n:
                self.core.act("clip", f"agc: {n} units clipped to {clipper.clip_factor} of "
                                      "their weight norm", step=step, units=n)
        asked = dict(plan.actions).get("clip") if plan.actions else None
        coef = self.core.clip_scale(clipper, asked, stats.grad_norm, step)
        if coef < 1.0:
            scale_grads(grads, coef)

    # -- the update ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def applying(self) -> Iterator[None]:
        """The Guard's LR scale in force, and the step not taken for a foreign one."""
        self.loopcheck.inside = True
        try:
            with self.lr.applied(self.optimizer):
                yield
        finally:
            self.loopcheck.inside = False

    def optimizer_step(self, scaled: bool) -> None:
        """The user's update, at the Guard's LR scale (through the scaler under fp16)."""
        if self.outside:
            return  # the framework steps right after decide_step, inside applying()
        if self.master is None and self.lr.scale == 1.0:
            # the common step: what applying() does, without two generator context managers
            self.loopcheck.inside = True
            try:
                self._update(scaled)
            finally:
                self.loopcheck.inside = False
            return
        with self.applying(), (self.master.stepping() if self.master is not None
                                else contextlib.nullcontext()):
            self._update(scaled)

    def _update(self, scaled: bool) -> None:
        if scaled:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.needs_closure:
            if self.closure is None:
                raise TypeError(CLOSURE_NEEDED.format(type(self.optimizer).__name__))
            self.optimizer.step(self.closure)
        else:
            self.optimizer.step()

    def apply(self, scaled: bool, stats: StepStats) -> bool:
        saved = None if self.outside else self.measure.before_update(stats)
        self.optimizer_step(scaled)
        if stats.scaler_overflow:
            return False
        self.measure.after_update(saved, stats)
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    # -- bookkeeping after a step -------------------------------------------------------------
    def snapshot(self, step: int) -> bool:
        """Take a rollback snapshot of verified state only (issue #12: a snapshot taken between
        parameter checks held the corruption a later rollback restored). A failed check takes
        none and has the next step read parameters, optimizer state and buffers, so the
        corruption is named and rolled back to an older verified snapshot."""
        if not self.measure.agree(self.snapshots.verify(HUGE_WEIGHT, HUGE_STATE)):
            self.measure.force_params = True
            self.core.event("snapshot_refused", step=step,
                            reason="parameters, optimizer state or buffers failed the check")
            return False
        self.snapshots.take(step)
        self.core.good_state(step)
        return True

    def after_step(self, stats: StepStats, applied: bool, severe: bool, step: int,
                   snapshot: bool = True) -> None:
        core = self.core
        if applied:
            core.applied_steps += 1
        quiet = step - core.last_severe > QUIET
        if (stats.param_norm is not None and stats.params_finite and not severe
                and not (stats.huge_param_modules or stats.nonfinite_optimizer_modules
                         or stats.nonfinite_buffers)):
            core.good_state(step)  # a parameter check (its cadence) found the state good
        if snapshot and applied and quiet and (step + 1) % self.snapshots.every == 0:
            self.snapshot(step + 1)
        if core.sinks and (step % self.log_every == 0 or severe or stats.activations):
            core.stats(stats)
