"""The Guard: wires probe -> detectors -> policy -> remedies -> sinks for one training loop.

    guard = tg.Guard(model, optimizer)            # AMP: tg.Guard(model, optimizer, scaler=scaler)
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()                            # AMP: scaler.scale(loss).backward()
        guard.step(loss)                           # replaces optimizer.step() (and scaler.step/update)

Per step (default ``sync=True``): one fused measurement and one host transfer, pure-Python
detectors, the policy's plan, then the remedies (halt, rollback, lr_backoff, skip, clip) and
finally the optimizer step. With ``sync=False`` nothing on the step path waits for the device:
the skip decision for non-finite values is made on the device (a 0/1 select of the update),
clipping uses a threshold computed one step earlier, and the host-side detectors read each
step's statistics one step late.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
import weakref
from collections import Counter, deque
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence

import numpy as np
import torch
from torch import nn

from .core import DecisionCore
from .detect import Detector
from .policy import Plan, Policy
from .remedies.clip import AGC, make_clipper, scale_grads
from .remedies.buffers import RunningStats
from .remedies.lr import LRController
from .remedies.snapshot import SnapshotStore
from .report.base import Sink
from .stats import (ActivationSampler, Probe, StepStats, _local, build_stats, chance_level,
                    optimizer_kind)
from .types import Action, Finding


def _check_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: model -> the Guard guarding it (weakly on both sides)
_LIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _release_hooks(sampler: Any, capture: Any, loopcheck: Any) -> None:
    sampler.disarm()
    loopcheck.remove()
    if capture is not None:
        capture.remove()


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``): wrappers that do not run ``Optimizer.__init__`` have no
    hook registry, and their ``step`` adds framework logic (accumulation gating, scaler steps)
    that the Guard replaces. A GradScaler the wrapper holds is passed as ``scaler=``
    (``accelerator.scaler``)."""
    for _ in range(4):
        if hasattr(optimizer, "_optimizer_step_post_hooks"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        if isinstance(model, FSDP):
            return True
    except Exception:  # pragma: no cover
        pass
    return any(hasattr(p, "_local_tensor") for p in model.parameters())


class _Decision:
    """One step's measurement, findings and plan, before anything is carried out."""
    __slots__ = ("stats", "grads", "scaled", "plan", "findings", "severe")

    def __init__(self, stats: StepStats, grads: list, scaled: bool, plan: Plan,
                 findings: list[Finding], severe: bool) -> None:
        self.stats, self.grads, self.scaled, self.plan = stats, grads, scaled, plan
        self.findings, self.severe = findings, severe


class Guard:
    """Keeps one training loop numerically stable.

    Args:
        model: the ``nn.Module`` being trained (DDP/FSDP wrappers welcome).
        optimizer: its ``torch.optim.Optimizer``; ``guard.step(loss)`` calls its ``step()``.
        scaler: a ``torch.amp.GradScaler`` for fp16; the Guard unscales, measures, then calls
            ``scaler.step`` and ``scaler.update``. The scaler's own overflow skips are recorded
            as events, not treated as instability.
        scheduler: optional LR scheduler that the Guard steps after every *applied* update
            (skipped steps do not advance it). Leave it out to step schedulers yourself;
            ``guard.step`` returns whether the update was applied.
        policy: a :class:`~trainguard.policy.Policy` (escalation ladders); default ladders
            clip -> skip -> lr_backoff -> rollback -> halt.
        clip: ``"adaptive"`` (default, z-score of the gradient norm), ``"norm"`` or a number
            (fixed global-norm clipping), ``"agc"`` (unit-wise adaptive), or ``None``.
        detectors: detector instances (default: one per finding kind).
        sync: ``True`` (default): one small host transfer per step. ``False``: no host sync on
            the step path (device-side skip, statistics read one step late).
        sample_every: activation probes (dead/saturated units, signal propagation) and the
            update-to-weight ratio run on the first step and every ``sample_every`` steps;
            after a rollback, every ``sample_every // 10`` steps for the next ``sample_every``
            steps (a close watch on the restored run, so a repeat is caught within a few steps).
        param_norm_every: parameter norms are measured every this many steps (default 10:
            a second fused pass over all weights every step would cost ~1% of a 7 ms step on
            its own, see bench/overhead.py) and at once whenever a value is non-finite.
        snapshot_every, snapshots, snapshot_device: rollback snapshot cadence, how many to
            keep, and where to hold them (default every 100 steps, 2 kept, in CPU RAM).
        console: print one line per intervention and a summary (rich when installed).
        log: path of a JSONL event log (findings, actions, sampled statistics).
        log_every: write statistics to the log every this many steps (default 10).
        sinks: extra :class:`~trainguard.report.Sink` objects.
        locate: when a non-finite value appears, replay the step to name the first module
            that produced it (see :mod:`trainguard.locate`); healthy steps only keep
            references to the inputs and the output gradient.
        locate_dir: write a reproducer bundle there for each located failure
            (``trainguard replay BUNDLE``).
        model_factory: ``"module:callable"`` that rebuilds the model, stored in the bundle's
            manifest so ``trainguard replay`` needs no ``--factory``.
        keep_records: ``guard.findings`` and ``guard.actions`` hold at most this many of the
            most recent entries (default 10,000), so a week-long run that clips often does not
            grow them without bound; ``guard.finding_counts`` / ``guard.action_counts`` and
            the summary count everything, and the JSONL log keeps every event.
        chance_loss: the loss of an uninformed guess when the loss is a cross-entropy (ln V
            for V classes or tokens), the reference of the divergence detector's
            "above chance" rule. ``"auto"`` (default): inferred at the first step when the
            first loss is within 15% of ln V for V = the output size of the model's last
            ``nn.Linear`` or an ``nn.Embedding``'s vocabulary (a classifier or language
            model at initialisation); a number: that level; ``None``: no such rule.
        on_reset: called with the :class:`Action` right after every skip and rollback, so the
            loop can reset the state it carries between steps and the Guard cannot see: a
            recurrent hidden state fed back from the previous batch (which a NaN poisons for
            every later step), EMA weights, a data position. ``guard.step`` also returns
            False on those steps.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 scaler: Any = None, scheduler: Any = None, policy: Policy | None = None,
                 clip: Any = "adaptive", detectors: Sequence[Detector] | None = None,
                 sync: bool = True, sample_every: int = 50, param_norm_every: int = 10,
                 snapshot_every: int = 100, snapshots: int = 2, snapshot_device: str = "cpu",
                 console: bool = True, log: str | None = None, log_every: int = 10,
                 sinks: Iterable[Sink] = (), locate: bool = True,
                 locate_dir: str | None = None, model_factory: str | None = None,
                 process_group: Any = None, keep_records: int = 10_000,
                 chance_loss: float | str | None = "auto",
                 on_reset: Callable[[Action], None] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        optimizer = unwrap_optimizer(optimizer)
        sparse = [n or "(root)" for n, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)]
        if sparse or isinstance(optimizer, torch.optim.SparseAdam):
            raise TypeError("trainguard does not support sparse gradients "
                            f"({'nn.Embedding(sparse=True) at ' + ', '.join(sparse[:3]) if sparse else 'SparseAdam'}): "
                            "use sparse=False with Adam/AdamW (dense gradients), or train "
                            "without the Guard")
        if scaler is not None and not all(hasattr(scaler, a) for a in ("unscale_", "step", "update")):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if scheduler is not None:
            if not callable(getattr(scheduler, "step", None)):
                raise TypeError("scheduler must be a torch LR scheduler (an object with "
                                f"step()), got {type(scheduler).__name__}")
            sched_opt = getattr(scheduler, "optimizer", None)
            if sched_opt is not None and sched_opt is not optimizer:
                raise ValueError("scheduler drives another optimizer than the one given to the "
                                 "Guard: build it on the same optimizer")
        if locate_dir is not None and os.path.exists(locate_dir) and not os.path.isdir(locate_dir):
            raise ValueError(f"locate_dir must be a directory (it is created if missing), got "
                             f"the file {locate_dir!r}")
        if on_reset is not None and not callable(on_reset):
            raise TypeError(f"on_reset must be callable (it receives the Action), got "
                            f"{type(on_reset).__name__}")
        self.on_reset = on_reset
        self.rank, self.world_size = _dist_info()
        out: list[Sink] = []
        if console:
            from .report.console import ConsoleSink
            out.append(ConsoleSink(rank=self.rank))
        if log:
            from .report.jsonl import JsonlSink
            out.append(JsonlSink(log, rank=self.rank))
        out.extend(sinks)
        me_ = weakref.ref(self)  # the core must not keep the Guard alive

        def on_action(a: Action) -> None:
            g = me_()
            if g is not None:
                g._on_action(a)
        #: the torch-free decision core: detectors, policy, records, summary, state
        self.core = DecisionCore(policy=policy, detectors=detectors, sinks=out,
                                 keep_records=keep_records, chance_loss=chance_loss,
                                 on_action=on_action)
        self.model, self.optimizer, self.scaler, self.scheduler = model, optimizer, scaler, scheduler
        if clip == "adaptive" and not self.policy.acts:
            clip = None  # a policy that never acts does not clip by default either
        self.clipper = make_clipper(clip)
        self.sync = bool(sync)
        self.sample_every = _check_int("sample_every", sample_every)
        self.param_norm_every = _check_int("param_norm_every", param_norm_every)
        self.log_every = _check_int("log_every", log_every)
        self.probe = Probe(model, optimizer, sharded=_is_sharded(model), process_group=process_group)
        self.sampler = ActivationSampler(model)
        self.running = RunningStats(model)  # BatchNorm statistics a skipped batch must not keep
        self.snapshots = SnapshotStore(model, optimizer, self.probe.params, scaler,
                                       every=_check_int("snapshot_every", snapshot_every),
                                       keep=_check_int("snapshots", snapshots), device=snapshot_device)
        self.lr = LRController(factor=self.policy.lr_backoff, min_scale=self.policy.min_lr_scale)
        self.locate_enabled = bool(locate)
        self._capture: Any = None
        if self.locate_enabled:
            try:
                from .locate import StepCapture
                self._capture = StepCapture(model, optimizer=optimizer, scaler=scaler,
                                            bundle_dir=locate_dir, model_factory=model_factory)
            except ImportError:  # locate not available
                self._capture = None
        self._watch_until = -1  # close watch (frequent probes) after a rollback
        # step of the snapshot last restored, and the step it was restored at (a step number,
        # not the snapshot: holding it would keep a dropped snapshot's tensors alive)
        self._restored_step = -1
        self._restored_at = -1
        self.last_step_applied = True
        self._opt_kind = optimizer_kind(optimizer)
        self._pending: deque[tuple] = deque()  # sync=False: steps whose statistics are in flight
        self._post: dict[str, float] | None = None  # optimizer-state stats of the last sampled update
        self._group_of = {id(p): grp for grp in optimizer.param_groups for p in grp["params"]}
        self._state_owner: list[int] = []
        self._closed = False
        self._observed: list[Any] = []  # losses shown by observe_loss since the last step
        self._outside = False  # decide_step: the framework takes the optimizer step itself
        self._backup: Any = None  # sync=False: preallocated copies for the device-side select
        self.sampler.arm()  # the first forward is probed
        from .loopcheck import LoopCheck
        me = weakref.ref(self)  # hooks must not keep the Guard alive

        def report(kind: str, msg: str) -> None:
            g = me()
            if g is not None:
                g._event("loop_misuse", check=kind, message=msg)
        self.loopcheck = LoopCheck(self.probe.params, optimizer, report)
        # one Guard per model: a new one replaces a live one (which piled up hooks before),
        # and a Guard collected without close() takes its hooks with it
        prev = _LIVE.get(model)
        old = prev() if prev is not None else None
        if old is not None and not old._closed:
            warnings.warn("trainguard: a new Guard on a model that already has one: the old Guard "
                          "is closed (call guard.close() when you are done with it)",
                          RuntimeWarning, stacklevel=2)
            old._detach()
        _LIVE[model] = me
        self._finalizer = weakref.finalize(self, _release_hooks, self.sampler, self._capture,
                                           self.loopcheck)

    # ------------------------------------------------------------------ the core's records
    def _on_action(self, a: Action) -> None:
        if self.on_reset is not None and a.kind in ("skip", "rollback"):
            self.on_reset(a)

    policy = property(lambda self: self.core.policy)
    detectors = property(lambda self: self.core.detectors)
    sinks = property(lambda self: self.core.sinks)
    findings = property(lambda self: self.core.findings)
    actions = property(lambda self: self.core.actions)
    finding_counts = property(lambda self: self.core.finding_counts)
    action_counts = property(lambda self: self.core.action_counts)
    history = property(lambda self: self.core.history)
    keep_records = property(lambda self: self.core.keep_records)
    chance_loss = property(lambda self: self.core.chance_loss,
                           doc="The chance level (ln V) in use, or None.")

    @property
    def counts(self) -> Counter:
        return self.core.counts

    @property
    def step_count(self) -> int:
        return self.core.step_count

    @step_count.setter
    def step_count(self, v: int) -> None:
        self.core.step_count = v

    @property
    def applied_steps(self) -> int:
        return self.core.applied_steps

    @applied_steps.setter
    def applied_steps(self, v: int) -> None:
        self.core.applied_steps = v

    @property
    def rollbacks(self) -> int:
        return self.core.rollbacks

    @rollbacks.setter
    def rollbacks(self, v: int) -> None:
        self.core.rollbacks = v

    @property
    def _last_severe(self) -> int:
        return self.core.last_severe

    @_last_severe.setter
    def _last_severe(self, v: int) -> None:
        self.core.last_severe = v

    # ------------------------------------------------------------------ public API
    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Measure, decide and apply (or skip) the optimizer update. Returns True when the
        update was applied. Raises :class:`TrainingUnstable` when repairs are exhausted.

        ``loss`` is the step's loss (a scalar tensor, no sync needed); ``None`` when the loop
        cannot show it (then the losses given to :meth:`observe_loss` since the last step are
        used, and without those the loss-based detectors sit the step out)."""
        loss = self._loss_for_step(loss)
        self.loopcheck.before(self.step_count)
        if self.sync:
            applied = self._finish(self._decide(loss))
        else:
            applied = self._step_deferred(loss)
        return self._end_step(applied)

    def observe(self, loss: torch.Tensor | float | None = None) -> list[Finding]:
        """Observe-only: measure the gradients as they are, detect and report, and return this
        step's findings; never call ``optimizer.step()``, never touch the gradients, the
        weights or the learning rate (for stacks that must keep their own step: DeepSpeed, a
        custom trainer). A GradScaler's gradients are read scaled and their norms divided by
        the scale. Call it once per optimizer step, after the backward pass and before the
        step."""
        loss = self._loss_for_step(loss)
        d = self._decide(loss, observe=True)
        self.lr.tick(troubled=d.severe)
        self._after_step(d.stats, True, d.severe, snapshot=False)
        self.applied_steps -= 1  # the framework applies (or not) the update; not counted here
        self.step_count += 1
        self._arm_if_due()
        return d.findings

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Show the Guard a loss it would not otherwise see (a framework that calls
        ``optimizer.step()`` itself): call it once per micro-batch with that micro-batch's loss
        as computed (not divided by the accumulation factor); the next step uses their mean."""
        self._check_loss(loss)
        self._observed.append(loss.detach().reshape(()) if isinstance(loss, torch.Tensor)
                              else float(loss))

    def _check_loss(self, loss: Any) -> None:
        if self._closed:
            raise RuntimeError("this Guard was closed; create a new one to keep training")
        if loss is None:
            return
        if isinstance(loss, bool) or not isinstance(loss, (torch.Tensor, float, int)):
            raise TypeError(f"guard.step expects the loss (a scalar tensor or float), got "
                            f"{type(loss).__name__}")
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(f"guard.step expects a scalar loss, got a tensor of shape {tuple(loss.shape)}")

    def _loss_for_step(self, loss: Any) -> Any:
        self._check_loss(loss)
        seen, self._observed = self._observed, []
        if loss is not None or not seen:
            return loss
        if all(isinstance(v, float) for v in seen):
            return sum(seen) / len(seen)
        dev = self.probe.device
        return torch.stack([v.to(dev, torch.float32) if isinstance(v, torch.Tensor)
                            else torch.tensor(v, device=dev) for v in seen]).mean()

    def _end_step(self, applied: bool) -> bool:
        self.loopcheck.after(self.step_count)
        self.last_step_applied = applied
        self.step_count += 1
        self._arm_if_due()
        return applied

    def _arm_if_due(self) -> None:
        every = self.sample_every
        if self.step_count <= self._watch_until:
            every = max(1, every // 10)
        if self.step_count % every == 0:
            self.sampler.arm()

    @property
    def lr_scale(self) -> float:
        """The Guard's current learning-rate multiplier (1.0 = the scheduled LR)."""
        return self.lr.scale

    def summary(self) -> str:
        """A human-readable account of the run so far."""
        return self.core.summary(self.lr.scale)

    def close(self) -> None:
        """Flush the sinks (prints the summary on the console) and remove hooks."""
        if self._closed:
            return
        if not self.sync and self._pending:
            self._drain_pending()
        self._detach()
        self.core.close(self.summary())

    def _detach(self) -> None:
        """Remove every hook this Guard put on the model and the optimizer."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Guard state (statistics, escalation counters, LR scale, clip statistics) so a
        resumed run keeps its history. Plain Python values only."""
        return {**self.core.state_dict(), "lr": self.lr.state_dict(),
                "clip": self.clipper.state_dict() if self.clipper is not None else None,
                "clip_type": type(self.clipper).__name__ if self.clipper is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. All or nothing: a malformed dict raises
        ValueError and leaves the Guard exactly as it was."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("expected a dict from Guard.state_dict() (version 1)")
        missing = [k for k in ("step_count", "applied_steps", "rollbacks", "detectors", "policy",
                               "lr") if k not in state]
        if missing:
            raise ValueError(f"malformed Guard state: missing {missing}; expected a dict from "
                             "Guard.state_dict()")
        backup = self.state_dict()
        saved_opt, saved_chance = self.core.chance_option, self.core.chance_loss
        try:
            self._apply_state(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            self.core.chance_option, self.core.chance_loss = saved_opt, saved_chance
            self._apply_state(backup)
            raise ValueError(f"malformed Guard state ({type(e).__name__}: {e}); the Guard is "
                             "unchanged") from e

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)
        self.lr.load_state_dict(state["lr"])
        if (self.clipper is not None and state.get("clip") is not None
                and state.get("clip_type", type(self.clipper).__name__) == type(self.clipper).__name__):
            # statistics of another kind of clipper (the run resumed with a new clip=) do not apply
            self.clipper.load_state_dict(state["clip"])

    # ------------------------------------------------------------------ internals
    def _emit_finding(self, f: Finding) -> None:
        self.core.emit(f)

    def _act(self, kind: str, reason: str, **detail: Any) -> Action:
        return self.core.act(kind, reason, **detail)

    def _event(self, kind: str, **data: Any) -> None:
        self.core.event(kind, **data)

    def _scaler_ready(self) -> bool:
        """Unscale the gradients if the user has not; False if the scaler is disabled."""
        sc = self.scaler
        if sc is None or not getattr(sc, "is_enabled", lambda: True)():
            return False
        states = getattr(sc, "_per_optimizer_states", None)
        stage = states[id(self.optimizer)]["stage"] if states is not None else None
        if stage is None or getattr(stage, "name", "") == "READY":
            sc.unscale_(self.optimizer)
        return True

    def _extra_tensors(self, scaled: bool, buffers: bool = False
                       ) -> tuple[list[torch.Tensor], list[str], dict]:
        extra: list[torch.Tensor] = []
        names: list[str] = []
        n_buf = {}
        if buffers and self.running:
            extra.append(self.running.norms())
            names.append("__buffers__")
            n_buf = {"__buffers__": len(self.running.floats)}
        if buffers:
            state, self._state_owner = self._optimizer_state_tensors()
            if state:
                with torch.no_grad():
                    extra.append(torch.stack(torch._foreach_norm(state, 2,
                                                                 dtype=self.probe.norm_dtype)))
                names.append("__optstate__")
                n_buf["__optstate__"] = len(state)
        if scaled and getattr(self.scaler, "_scale", None) is not None:
            extra.append(self.scaler._scale.detach().float().reshape(1))
            names.append("__scale__")
        found = self._scaler_found_inf() if scaled else None
        if found is not None:
            extra.append(found)
            names.append("__found_inf__")
        acts = self.sampler.collect()
        for name, (kind, t) in acts.items():
            extra.append(t)
            names.append(name)
        return extra, names, {**{n: k for n, (k, _) in acts.items()}, **n_buf}

    def _optimizer_state_tensors(self) -> tuple[list[torch.Tensor], list[int]]:
        """Floating-point optimizer state shaped like its parameter (moments, square averages,
        momentum buffers), with the index of the parameter each belongs to. Read on the
        parameter-norm cadence: Inf in Adam's exp_avg_sq freezes a weight silently (issue #12,
        item 3)."""
        out: list[torch.Tensor] = []
        owner: list[int] = []
        state = self.optimizer.state
        for i, p in enumerate(self.probe.params):
            st = state.get(p)
            if not st:
                continue
            for v in st.values():
                if (isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0
                        and v.numel() == p.numel()):
                    out.append(_local(v.detach()))
                    owner.append(i)
        return out, owner

    def _scaler_found_inf(self) -> torch.Tensor | None:
        """The scaler's own verdict after ``unscale_`` (the inf/NaN count it will skip the
        step on), as a 1-element tensor for the step's one transfer; None when the scaler
        keeps no such state (then the verdict is inferred from the gradient norms)."""
        states = getattr(self.scaler, "_per_optimizer_states", None)
        st = states.get(id(self.optimizer)) if isinstance(states, dict) else None
        found = st.get("found_inf_per_device") if isinstance(st, dict) else None
        if not found:
            return None
        dev = self.probe.device
        return torch.stack([t.detach().to(dev, torch.float32).reshape(()) for t in found.values()]
                           ).sum().reshape(1)

    @staticmethod
    def _unpack_extra(vals: np.ndarray, names: list[str], kinds: dict) -> tuple[float | None, dict | None]:
        scale = None
        acts: dict[str, dict] = {}
        i = 0
        for n in names:
            if n == "__scale__":
                scale = float(vals[i])
                i += 1
                continue
            if n == "__found_inf__":
                acts["__found_inf__"] = {"value": float(vals[i])}
                i += 1
                continue
            if n in ("__buffers__", "__optstate__"):
                k = int(kinds[n])
                acts[n] = {"values": vals[i:i + k]}
                i += k
                continue
            dead, sat, q, units = vals[i:i + 4]
            i += 4
            if kinds[n] == "recurrent":  # backward signal through time (first vs last step)
                first, last = float(dead), float(sat)
                acts[n] = {"kind": "recurrent", "dead_fraction": None, "saturated_fraction": None,
                           "second_moment": None, "steps": int(units),
                           "time_grad_ratio": first / last if last > 0 else math.nan}
                continue
            if kinds[n] == "softmax":  # attention: one-hot row fraction and max |logit|
                acts[n] = {"kind": "softmax", "dead_fraction": None,
                           "saturated_fraction": None if math.isnan(sat) else float(sat),
                           "second_moment": None, "max_logit": float(q), "units": int(units)}
                continue
            acts[n] = {"kind": kinds[n], "dead_fraction": None if math.isnan(dead) else float(dead),
                       "saturated_fraction": None if math.isnan(sat) else float(sat),
                       "second_moment": float(q), "units": int(units)}
        return scale, (acts or None)

    def _current_lr(self) -> float | None:
        try:
            lr = self.optimizer.param_groups[0]["lr"]
            return float(lr) * self.lr.scale
        except (KeyError, IndexError, TypeError, ValueError):
            return None

    def _measure(self, loss: torch.Tensor | float | None, observe: bool = False
                 ) -> tuple[StepStats, list, bool]:
        divide = None
        if observe:
            scaled = False  # never unscale: the framework owns the scaler's protocol
            sc = self.scaler
            if sc is not None and getattr(sc, "is_enabled", lambda: True)():
                states = getattr(sc, "_per_optimizer_states", None)
                stage = states[id(self.optimizer)]["stage"] if states is not None else None
                if stage is None or getattr(stage, "name", "") == "READY":
                    divide = float(sc.get_scale())
        else:
            scaled = self._scaler_ready()
        known = loss is not None
        if loss is None:
            loss = math.nan
        with_params = self.step_count % self.param_norm_every == 0
        extra, names, kinds = self._extra_tensors(scaled, buffers=with_params)
        gn, idx, pn, ev, lv = self.probe.measure(loss, with_params=with_params, extra=extra)
        scale, acts = self._unpack_extra(ev, names, kinds)
        found = acts.pop("__found_inf__", None) if acts else None
        bufs = acts.pop("__buffers__", None) if acts else None
        ost = acts.pop("__optstate__", None) if acts else None
        if acts is not None and not acts:
            acts = None
        if not np.isfinite(gn).all():
            # rare path: a norm that overflowed fp32 (finite values ~1e20 square past 3.4e38)
            # is not a non-finite gradient; fp64 tells them apart
            gn = self.probe.exact_grad_norms(gn)
        if divide:
            gn = gn / divide
        stats = build_stats(self.step_count, self.probe, gn, idx, pn, float(lv[0]),
                            lr=self._current_lr(), loss_scale=scale, activations=acts,
                            optimizer=self._opt_kind, optimizer_state=self._post)
        stats.loss_known = known
        self._post = None
        if found is not None:
            # the scaler's own verdict: it skips exactly when it found inf/NaN (issue #12: a
            # norm overflow was taken for a scaler skip, the scaler applied the update, and
            # guard.step returned False)
            stats.scaler_overflow = found["value"] > 0 and stats.loss_finite and stats.params_finite
        elif scaled and not stats.grads_finite and stats.loss_finite and stats.params_finite:
            stats.scaler_overflow = True
        if not with_params and not (stats.loss_finite and stats.grads_finite):
            # something is non-finite: measure the parameters now (rare, off the healthy path)
            # so that corrupted weights are named at once
            _, _, pn_now, _, _ = self.probe.measure(0.0, with_params=True)
            assert pn_now is not None
            pn = pn_now
            with np.errstate(over="ignore", invalid="ignore"):
                stats.param_norms = self.probe.group_norms(pn, self.probe._all_idx).tolist()
                stats.param_norm = float(np.sqrt(np.sum(np.square(pn))))
            if self.running:
                bufs = {"values": self.running.norms().cpu().numpy()}
        if stats.param_norms is not None and not stats.params_finite:
            # an fp32 norm overflows for finite weights of ~1e19: tell them from NaN/Inf
            pn64 = self.probe.exact_param_norms()
            g64 = self.probe.group_norms(pn64, self.probe._all_idx)
            with np.errstate(over="ignore", invalid="ignore"):
                huge = [m for m, a, b in zip(self.probe.modules, stats.param_norms, g64)
                        if not math.isfinite(a) and math.isfinite(b)]
            if huge:
                stats.huge_param_modules = huge
                stats.param_norms = g64.tolist()
                stats.param_norm = float(np.sqrt(np.sum(np.square(pn64))))
        if ost is not None:
            bad = np.flatnonzero(~np.isfinite(ost["values"]))
            if len(bad):
                stats.nonfinite_optimizer_modules = sorted(
                    {self.probe.modules[self.probe.group[self._state_owner[i]]] for i in bad})
        if bufs is not None:
            ok = np.isfinite(bufs["values"])
            if ok.all():
                self.running.keep()  # verified: the copy a skip restores
            else:
                stats.nonfinite_buffers = sorted({self.running.names[i] for i in np.flatnonzero(~ok)})
                self.running.restore()
        return stats, self.probe.last_grads, scaled

    def _decide(self, loss: Any, observe: bool = False) -> "_Decision":
        """Measure, detect, locate, record the findings and ask the policy: everything up to
        the plan, nothing carried out yet."""
        if not observe and not self.snapshots.snaps and self.rollbacks == 0:
            self.snapshots.take(self.step_count)  # before any update: the last-resort rollback
        stats, grads, scaled = self._measure(loss, observe=observe)
        self.history.append(stats)
        findings = self._detect(stats)
        if stats.scaler_overflow and not any(f.kind == "nonfinite" for f in findings):
            self._event("scaler_overflow", loss_scale=stats.loss_scale)
        findings = self._locate(findings, stats)
        for f in findings:
            self._emit_finding(f)
        plan = Plan() if observe else self.core.decide(findings)
        severe = any(f.severe for f in findings)
        if observe and severe:
            self._last_severe = self.step_count
        return _Decision(stats, grads, scaled, plan, findings, severe)

    def _finish(self, d: "_Decision") -> bool:
        """Carry out a decision: remedies, then the optimizer step (or not)."""
        applied = self._execute(d.plan, d.stats, d.grads, d.scaled)
        self.lr.tick(troubled=d.severe)
        self._after_step(d.stats, applied, d.severe)
        return applied

    def _detect(self, stats: StepStats) -> list[Finding]:
        """Every detector over one step's statistics (the chance level is fixed first)."""
        return self.core.detect(stats, lambda loss: chance_level(self.model, loss))

    def _locate(self, findings: list[Finding], stats: StepStats) -> list[Finding]:
        if self._capture is None or not any(f.kind == "nonfinite" for f in findings):
            if self._capture is not None:
                self._capture.release()
            return findings
        try:
            out = [self._capture.refine(f, self.model, stats) if f.kind == "nonfinite" else f
                   for f in findings]
        except Exception as e:  # locating must never break training
            self._event("locate_failed", error=f"{type(e).__name__}: {e}")
            out = findings
        self._capture.release()
        return out

    def _halt(self, reason: str, finding: Finding | None) -> NoReturn:
        err = self.core.halt(reason, finding, self.lr.scale)
        self._detach()
        raise err

    def _finish_scaler_step(self, scaled: bool) -> None:
        """Close the scaler's per-step bookkeeping when no optimizer step is taken (the
        framework does it when it owns the step)."""
        if scaled and not self._outside:
            self.scaler.update()

    def _late_remedies(self, plan: Plan, scaled: bool) -> bool:
        """halt, rollback and lr_backoff; True when the update must not be applied."""
        kinds = plan.kinds()
        by = dict(plan.actions)
        if "halt" in kinds:
            f = by["halt"]
            self._halt(f"{f.kind} is configured to halt the run (policy.halt_on)", f)
        skip = False
        if "rollback" in kinds:
            f = by["rollback"]
            before = self.step_count - 1
            healthy = f.evidence.get("healthy_step") if isinstance(f.evidence, dict) else None
            if isinstance(healthy, int) and 0 <= healthy < before:
                before = healthy  # weights from before the damage (e.g. units killed since)
            snap = self.snapshots.pick(before_step=before)
            if (isinstance(healthy, int) and snap is not None and snap.step == self._restored_step
                    and healthy < self._restored_at):
                # no healthy probe since that snapshot was restored: it holds the damage too
                self.snapshots.drop(snap)
                snap = self.snapshots.pick(before_step=before)
            if snap is None:
                self._finish_scaler_step(scaled)
                self._halt("a rollback was needed but no snapshot is held", f)
            if self.rollbacks >= self.policy.max_rollbacks:
                self._finish_scaler_step(scaled)
                self._halt(f"{self.rollbacks} rollbacks did not stabilise the run "
                           f"(policy.max_rollbacks={self.policy.max_rollbacks})", f)
            self._finish_scaler_step(scaled)
            scaled = False
            self.snapshots.restore(snap)
            self._restored_step, self._restored_at = snap.step, self.step_count
            self.rollbacks += 1
            self.core.reset_detectors()
            self.sampler.arm()  # probe the restored weights on the next step
            self._watch_until = self.step_count + self.sample_every
            self._act("rollback", f"{f.kind}: restored the snapshot of step {snap.step}",
                      to_step=snap.step, finding=f.kind)
            skip = True
        if "lr_backoff" in kinds:
            f = by["lr_backoff"]
            lr_cause = f.evidence.get("cause") == "learning_rate"
            factor = self.policy.backoff_factor(f, repeat=self.counts["lr_cause_cuts"])
            if not self.lr.can_backoff(factor):
                self._finish_scaler_step(scaled)
                self._halt(f"the learning rate is already down to {self.lr.scale:.3g} of its "
                           f"schedule (policy.min_lr_scale={self.policy.min_lr_scale:g})", f)
            if lr_cause:
                self.counts["lr_cause_cuts"] += 1
            was, now = self.lr.backoff(factor, recover=not lr_cause)
            self._act("lr_backoff", f"{f.kind}: learning-rate scale {was:.3g} -> {now:.3g}",
                      before=was, after=now, finding=f.kind)
        return skip

    def _execute(self, plan: Plan, stats: StepStats, grads: list[torch.Tensor], scaled: bool) -> bool:
        if self._late_remedies(plan, scaled):
            return False
        kinds = plan.kinds()
        by = dict(plan.actions)
        if "skip" in kinds:
            f = by["skip"]
            if stats.scaler_overflow:
                pass  # the scaler skips by itself below
            else:
                self._finish_scaler_step(scaled)
                if self.running:
                    self.running.restore()  # the skipped batch's forward leaves no trace
                self._act("skip", f"{f.kind}: update not applied (parameters, optimizer "
                                  "moments and step counters untouched"
                                  + ("; normalisation running statistics restored"
                                     if self.running else "") + ")", finding=f.kind)
                return False
        self._clip(plan, stats, grads)
        return self._apply(scaled, stats)

    def _clip(self, plan: Plan, stats: StepStats, grads: list[torch.Tensor]) -> None:
        if not stats.grads_finite:
            return
        norm = stats.grad_norm
        thr = math.inf
        reason = ""
        if self.clipper is not None and not isinstance(self.clipper, AGC):
            coef = self.clipper.coefficient(norm)
            if coef < 1.0:
                thr, reason = norm * coef, f"{self.clipper.name} clipping"
        by = dict(plan.actions)
        if "clip" in by:
            f = by["clip"]
            ref = f.evidence.get("median")
            if isinstance(ref, (int, float)) and ref > 0 and 2 * ref < thr:
                thr, reason = 2 * ref, f"{f.kind}: clipped to 2x the median norm"
            elif not reason:
                reason = f"{f.kind}: clipped by {self.clipper.name if self.clipper else 'policy'}"
        if isinstance(self.clipper, AGC):
            n = self.clipper.apply(self.probe.params)
            if n:
                self._act("clip", f"agc: {n} units clipped to {self.clipper.clip_factor} of "
                                  "their weight norm", units=n)
        if thr < norm:
            scale_grads(grads, thr / (norm + 1e-6))
            self._act("clip", f"{reason}: gradient norm {norm:.4g} -> {thr:.4g}",
                      norm=norm, threshold=thr)

    def decide_step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Everything :meth:`step` does except the optimizer's own update, for a framework that
        takes that step itself right after (the adapters' seam): measure, detect, repair
        (skip, clip, LR backoff, rollback, halt). Returns True when the framework must apply
        the update, inside ``with guard.applying():``; False when it must not (a skip or a
        rollback). A GradScaler given to the Guard is never stepped or updated here: the
        framework's scaler protocol stays the framework's."""
        self._outside = True
        try:
            return self.step(loss)
        finally:
            self._outside = False

    @contextlib.contextmanager
    def applying(self) -> Iterator[None]:
        """Around the framework's own ``optimizer.step()`` after :meth:`decide_step` returned
        True: the Guard's LR scale is in force and the step is not taken for a foreign one."""
        self.loopcheck.inside = True
        try:
            with self.lr.applied(self.optimizer):
                yield
        finally:
            self.loopcheck.inside = False

    def _optimizer_step(self, scaled: bool) -> None:
        """The user's update, at the Guard's LR scale (through the scaler under fp16)."""
        if self._outside:
            return  # the framework steps right after decide_step, inside applying()
        self.loopcheck.inside = True
        try:
            with self.lr.applied(self.optimizer):
                if scaled:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
        finally:
            self.loopcheck.inside = False

    def _apply(self, scaled: bool, stats: StepStats) -> bool:
        sample = stats.activations is not None and not self._outside
        params = [_local(p.detach()) for p in self.probe.params]
        before = [p.clone() for p in params] if sample else None
        self._optimizer_step(scaled)
        if stats.scaler_overflow:
            return False
        if before is not None:
            with torch.no_grad():
                diffs = list(torch._foreach_sub(params, before))
                n = len(params)
                vt = torch.stack(torch._foreach_norm(diffs + before, 2, dtype=self.probe.norm_dtype))
                v = self.probe._reduce(vt, n_norms=2 * n).cpu().numpy()
                dn, bn = v[:n], v[n:]
            idx = np.arange(len(dn))
            gd, gb = self.probe.group_norms(dn, idx), self.probe.group_norms(bn, idx)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.where(gb > 0, gd / gb, np.nan)
                stats.update_ratios = ratios.tolist()
            self._post = self._optimizer_state(params, diffs)
            if np.isfinite(ratios).any():  # read by the next step's detectors (plateau)
                self._post = dict(self._post or {}, update_ratio=float(np.nanmedian(ratios)))
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    @torch.no_grad()
    def _optimizer_state(self, params: list[torch.Tensor], diffs: list[torch.Tensor]) -> dict[str, float] | None:
        """On sampled steps: Adam's epsilon dominance and 16-bit update swamping (one transfer)."""
        counts: list[torch.Tensor] = []
        eps_val = None
        for p, lp, d in zip(self.probe.params, params, diffs):
            g = p.grad
            if g is None:
                continue
            g = _local(g)
            z = torch.zeros((), device=lp.device)
            if lp.dtype in (torch.float16, torch.bfloat16):
                nz = g != 0
                counts += [nz.sum().float(), (nz & (d == 0)).sum().float()]
            else:
                counts += [z, z]
            st = self.optimizer.state.get(p, {})
            grp = self._group_of.get(id(p))
            v, step = st.get("exp_avg_sq"), st.get("step")
            if v is not None and step is not None and grp is not None and "eps" in grp and "betas" in grp:
                eps_val = float(grp["eps"])
                b2 = float(grp["betas"][1])
                t = float(step)
                vh = _local(v).float() / max(1 - b2 ** t, 1e-12)
                seen = vh > 0
                counts += [seen.sum().float(), (seen & (vh.sqrt() < eps_val)).sum().float()]
            else:
                counts += [z, z]
        if not counts:
            return None
        c = self.probe._reduce(torch.stack([x.to(self.probe.device) for x in counts]), n_norms=0)
        c = c.cpu().numpy().reshape(-1, 4).sum(axis=0)
        out: dict[str, float] = {}
        if c[0] > 0:
            out["swamped_fraction"] = float(c[1] / c[0])
        if c[2] > 0:
            out["eps_dominated_fraction"] = float(c[3] / c[2])
            out["eps"] = eps_val if eps_val is not None else math.nan
        return out or None

    def _after_step(self, stats: StepStats, applied: bool, severe: bool,
                    snapshot: bool = True) -> None:
        if applied:
            self.applied_steps += 1
        quiet = self.step_count - self._last_severe > 10
        if snapshot and applied and quiet and (self.step_count + 1) % self.snapshots.every == 0:
            self.snapshots.take(self.step_count + 1)
        if self.sinks and (self.step_count % self.log_every == 0 or severe or stats.activations):
            self.core.stats(stats)

    # ------------------------------------------------------------------ sync=False
    def _step_deferred(self, loss: torch.Tensor | float) -> bool:
        from .deferred import deferred_step
        return deferred_step(self, loss)

    def _drain_pending(self) -> None:
        """Read every step whose statistics are still in flight (sync=False)."""
        from .deferred import drain
        while self._pending:
            drain(self)

    def __repr__(self) -> str:
        return (f"Guard(model={type(self.model).__name__}, optimizer={type(self.optimizer).__name__}, "
                f"clip={self.clipper!r}, sync={self.sync}, policy={self.policy!r})")
