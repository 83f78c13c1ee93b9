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
import functools
import os
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .chain import OptimizerChain, SchedulerList
from .core import CoreView, DecisionCore, check_int as _check_int, weak_call
from .deferred import DeferredStepper
from .detect import Detector
from .measure import StepProbe, scaler_enabled
from .model_loss import ModelLoss
from .policy import Plan, Policy
from .remedies.clip import make_clipper
from .remedies.executor import CLOSURE_NEEDED, Executor, ReuseFirst, needs_closure
from .remedies.lr import LRController
from .remedies.snapshot import SnapshotStore
from .sinks.base import Sink
from .stats import StepStats, chance_level, loss_kind, plain_cross_entropy
from .types import Action, Finding


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


#: model -> the Guard guarding it (weakly on both sides)
_LIVE: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _chance_from_box(model: nn.Module, box: list, first_loss: float) -> float | None:
    """The deferred stepper's chance inference (it holds no reference to the Guard)."""
    return chance_level(model, first_loss, kind=box[0])


def graph_kind(loss: torch.Tensor) -> str | None:
    """What a loss's autograd graph says it is (:func:`trainguard.stats.loss_kind`), with a
    cross-entropy as ``F.cross_entropy`` returns it told apart (``"plain_cross_entropy"``: its
    level is ln V even from a trained start)."""
    kind = loss_kind(loss)
    if kind == "cross_entropy" and plain_cross_entropy(loss):
        kind = "plain_cross_entropy"
    return kind


def _release_hooks(sampler: Any, capture: Any, loopcheck: Any, model_loss: Any) -> None:
    sampler.disarm()
    loopcheck.remove()
    model_loss.remove()
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


def closure_loss(value: Any) -> Any:
    """The loss a closure (or a framework's training step) returned, as the Guard takes it:
    a scalar tensor (detached) or number; Lightning's ``{"loss": ...}``; else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict) and isinstance(value.get("loss"), torch.Tensor):
        return value["loss"].detach()
    return None


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


class Guard(CoreView):
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
            the step path (device-side skip, statistics read one step late) on an accelerator;
            on the CPU, where the device is the host and there is nothing to wait for, it takes
            the default path (same-step decisions, no backup copies: it used to cost 1.3-2x the
            default there). ``"deferred"``: the deferred mode on any device (it is how the CPU
            test suite exercises the accelerator path).
        sample_every: activation probes (dead/saturated units, signal propagation) and the
            update-to-weight ratio run on the first step and every ``sample_every`` steps;
            after a rollback, every ``sample_every // 10`` steps for the next ``sample_every``
            steps (a close watch on the restored run, so a repeat is caught within a few steps).
        param_norm_every: parameter norms are measured every this many steps (default 10:
            a second fused pass over all weights every step would cost ~1% of a 7 ms step on
            its own, see bench/overhead.py) and at once whenever a value is non-finite.
        integrity: ``"cadence"`` (default): weights, optimizer state and buffers are checked
            for NaN/Inf and huge values every ``param_norm_every`` steps (and at once when the
            loss or a gradient is non-finite), so a latent corruption that the loss and
            gradients do not show (an Inf bias of a dead ReLU unit, a flipped exponent in
            Adam's ``exp_avg_sq``) is caught up to ``param_norm_every`` steps late.
            ``"step"``: every weight is checked every step, in the gradients' fused norm call,
            and the optimizer state that divides the update (``exp_avg_sq``, ``square_avg``,
            ``sum``, ...) in two rolling halves, so such a corruption is caught at its step or
            the next (momentum and ``exp_avg`` need no read: a bad value there reaches the
            weights in the same update). It costs one read of the weights and half a read of
            that state per step: Guard/bare 1.091 against 1.074 for the default on the
            worst-case CPU MLP step (docs/guard.md, "Fault campaign"); synchronous mode only.
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
            model at initialisation), unless the loss's autograd graph shows a regression,
            binary or margin loss (:func:`trainguard.stats.loss_kind`); a number: that
            level; ``None``: no such rule.
        checkpoint_dir: a folder for checkpoints that are never poisoned: every
            ``checkpoint_every`` steps (and on ``guard.save_checkpoint()``) the Guard writes model,
            optimizer, scaler and its own state there, only while ``guard.healthy`` (an unhealthy
            save waits for the next healthy step), keeping the newest ``checkpoints`` (default
            2). A rollback the in-memory snapshots cannot serve starts from the newest one at or
            before the last healthy step (read with ``weights_only=True``). See
            :mod:`trainguard.remedies.checkpoint`.
        report: write the HTML run report there at the end (``close()`` or a halt; the
            console summary ends with its path). It is drawn from the JSONL log: without
            ``log=``, one is written beside it (``run.html`` -> ``run.jsonl``).
        on_reset: called with the :class:`Action` right after every skip and rollback, so the
            loop can reset the state it carries between steps and the Guard cannot see: a
            recurrent hidden state fed back from the previous batch (which a NaN poisons for
            every later step), EMA weights, a data position. ``guard.step`` also returns
            False on those steps.
        judge_loss: whether the loss's value is judged: its spikes, its progress (divergence)
            and its stalls (plateau). ``"auto"`` (default): yes, until this Guard's steps and
            another Guard's take turns (a GAN's generator and discriminator, an actor and its
            critic: 3 turns, at least 1 in 10 steps): then the loss is coupled to the other
            model's and need not go down, so the progress rules (plateau, divergence's slow
            and ruin rules) go off, with a ``coupled_losses`` event that says so. ``True``:
            always. ``False``: never (a policy-gradient surrogate, a loss dominated by an
            entropy bonus: a loss that is not meant to go down); a non-finite loss is still a
            finding, and the gradients, units and optimizer state are judged as ever.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 scaler: Any = None, scheduler: Any = None, policy: Policy | None = None,
                 clip: Any = "adaptive", detectors: Sequence[Detector] | None = None,
                 sync: bool = True, sample_every: int = 50, param_norm_every: int = 10,
                 integrity: str = "cadence", snapshot_every: int = 100, snapshots: int = 2,
                 snapshot_device: str = "cpu",
                 console: bool = True, log: str | None = None, log_every: int = 10,
                 sinks: Iterable[Sink] = (), locate: bool = True,
                 locate_dir: str | None = None, model_factory: str | None = None,
                 process_group: Any = None, keep_records: int = 10_000,
                 chance_loss: float | str | None = "auto",
                 on_reset: Callable[[Action], None] | None = None,
                 checkpoint_dir: str | os.PathLike | None = None,
                 checkpoint_every: int | None = None, checkpoints: int = 2,
                 report: str | os.PathLike | None = None,
                 judge_loss: bool | str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(optimizer, (list, tuple)):  # several optimizers of one model, as one
            optimizer = OptimizerChain([unwrap_optimizer(o) if isinstance(o, torch.optim.Optimizer)
                                        else o for o in optimizer])
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a list of them), got "
                            f"{type(optimizer).__name__}")
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
        if needs_closure(optimizer):  # LBFGS: its closure evaluates the loss again and again
            name = type(optimizer).__name__
            if scaler_enabled(scaler):
                raise ValueError(f"{name} evaluates the loss several times per step, and torch's "
                                 "GradScaler does not support closures: train it without a "
                                 "scaler (fp32, or bf16 autocast)")
            first = next(iter(model.parameters()), None)
            if sync == "deferred" or (sync is False and first is not None
                                      and first.device.type != "cpu"):
                raise ValueError(f"{name} keeps its history in Python lists, which a skip decided "
                                 "on the device cannot restore: use Guard(sync=True)")
        if isinstance(scheduler, (list, tuple)):
            scheduler = SchedulerList(scheduler)
        if scheduler is not None:
            if not callable(getattr(scheduler, "step", None)):
                raise TypeError("scheduler must be a torch LR scheduler (an object with "
                                f"step()), got {type(scheduler).__name__}")
            mine = optimizer.optimizers if isinstance(optimizer, OptimizerChain) else [optimizer]
            for sched_opt in (scheduler.optimizers if isinstance(scheduler, SchedulerList)
                              else [getattr(scheduler, "optimizer", None)]):
                if sched_opt is not None and not any(sched_opt is o for o in [optimizer, *mine]):
                    raise ValueError("scheduler drives another optimizer than the one given to "
                                     "the Guard: build it on the same optimizer")
        if locate_dir is not None and os.path.exists(locate_dir) and not os.path.isdir(locate_dir):
            raise ValueError(f"locate_dir must be a directory (it is created if missing), got "
                             f"the file {locate_dir!r}")
        if on_reset is not None and not callable(on_reset):
            raise TypeError(f"on_reset must be callable (it receives the Action), got "
                            f"{type(on_reset).__name__}")
        self.on_reset = on_reset
        if checkpoint_every is not None:
            _check_int("checkpoint_every", checkpoint_every)
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir= (the folder to write to)")
        from .remedies.checkpoint import CheckpointStore
        self.checkpoint_store = (CheckpointStore(checkpoint_dir, checkpoints)
                                 if checkpoint_dir is not None else None)
        self.checkpoint_every = checkpoint_every
        self._checkpoint_due = False
        self._deferred_at = -1
        self._health: tuple[int, bool] | None = None
        self.rank, self.world_size = _dist_info()
        self.report_path = os.fspath(report) if report is not None else None
        if self.report_path is not None and log is None:
            log = os.path.splitext(self.report_path)[0] + ".jsonl"
        from .report import build_sinks
        out = build_sinks(console, log, sinks, rank=self.rank)
        me_ = weakref.ref(self)  # the core must not keep the Guard alive

        def on_action(a: Action) -> None:
            g = me_()
            if g is not None:
                g._on_action(a)
        #: the torch-free decision core: detectors, policy, records, summary, state
        self.core = DecisionCore(policy=policy, detectors=detectors, sinks=out,
                                 keep_records=keep_records, chance_loss=chance_loss,
                                 on_action=on_action, judge_loss=judge_loss)
        if self.report_path is not None and self.rank == 0:
            self.core.report_path = self.report_path
        if checkpoint_dir is not None:  # each rank's own ids (each reads its own batches)
            name = "bad_samples.json" if self.rank == 0 else f"bad_samples.rank{self.rank}.json"
            self.core.samples.path = os.path.join(os.fspath(checkpoint_dir), name)
        self.model, self.optimizer, self.scaler, self.scheduler = model, optimizer, scaler, scheduler
        if clip == "adaptive" and not self.policy.acts:
            clip = None  # a policy that never acts does not clip by default either
        self.clipper = make_clipper(clip)
        if not (isinstance(sync, bool) or sync == "deferred"):
            raise ValueError(f"sync must be True, False or 'deferred', got {sync!r}")
        self.sync = sync is True
        self.sample_every = _check_int("sample_every", sample_every)
        self.param_norm_every = _check_int("param_norm_every", param_norm_every)
        if integrity not in ("cadence", "step"):
            raise ValueError(f"integrity must be 'cadence' or 'step', got {integrity!r}")
        self.integrity = integrity
        self.log_every = _check_int("log_every", log_every)
        #: the torch side's measurement: fused norms, activations, buffers, post-update stats
        self.measure = StepProbe(model, optimizer, scaler, sharded=_is_sharded(model),
                                 process_group=process_group, sample_every=self.sample_every,
                                 param_norm_every=self.param_norm_every,
                                 check_weights=integrity == "step")
        self.probe, self.sampler, self.running = (self.measure.probe, self.measure.sampler,
                                                  self.measure.running)
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
        self.restructurer: Any = None
        self._last_input: Any = None
        if self.policy.structural == "repair":
            from .remedies.structure import Restructurer
            self.restructurer = Restructurer(model, optimizer)
        self.last_step_applied = True
        self._n_groups = len(optimizer.param_groups)  # add_param_group later: re-probed
        self._closed = False
        self._observed: list[Any] = []  # losses shown by observe_loss since the last step
        #: the loss the model returns, read while the loop shows the Guard none (model_loss.py)
        self._model_loss = ModelLoss(model, kind_of=graph_kind)
        self._model_loss.arm()
        #: what the first loss's autograd graph says it is (stats.loss_kind), in a box shared
        #: with the deferred stepper; read until the chance level is decided, then never
        self._loss_kind: list[str | None] = [None]
        box = self._loss_kind  # a new loss (core.loss_changed) is read again from its graph
        self.core.on_loss_changed.append(lambda: box.__setitem__(0, None))
        self.core.on_loss_changed.append(weak_call(self, "_rebase_clip"))
        from .loopcheck import LoopCheck
        me = weakref.ref(self)  # hooks must not keep the Guard alive

        def misuse(kind: str, msg: str) -> None:
            g = me()
            if g is not None:
                g.core.event("loop_misuse", check=kind, message=msg)
        self.loopcheck = LoopCheck(self.probe.params, optimizer, misuse)

        def on_halt() -> None:
            g = me()
            if g is not None:
                g._detach()
                g._write_report()
        #: carries out the core's plans: remedies, the optimizer step, the scaler's protocol
        self.executor = Executor(self.core, self.measure, optimizer, scaler=scaler,
                                 scheduler=scheduler, clipper=self.clipper, lr=self.lr,
                                 snapshots=self.snapshots, loopcheck=self.loopcheck,
                                 log_every=self.log_every, on_halt=on_halt,
                                 checkpoints=self.checkpoint_store)
        if self.restructurer is not None:
            self.restructurer.executor = self.executor
            self.restructurer.lr = self.lr
            rebind = weakref.WeakMethod(self._rebind)
            self.restructurer.rebind = lambda pairs: (m := rebind()) is not None and m(pairs)
            rescue = weakref.WeakMethod(self._rescue)  # the pieces hold no strong reference
            self.executor.rescue = lambda f, step: bool((m := rescue()) and m(f, step))
        capture = self._capture  # the pieces hold no reference to the Guard itself
        self._deferred = DeferredStepper(
            self.core, self.measure, self.executor,
            infer_chance=functools.partial(_chance_from_box, model, self._loss_kind),
            release=capture.release if capture is not None else (lambda: None),
        ) if sync == "deferred" or (sync is False and self.probe.device.type != "cpu") else None
        #: True when the step path never waits for the device (the deferred mode is running)
        self.deferred = self._deferred is not None
        if self.deferred and integrity == "step":
            warnings.warn("trainguard: integrity='step' needs the synchronous mode; with "
                          "sync=False on an accelerator weights and optimizer state are checked "
                          "every param_norm_every steps", RuntimeWarning, stacklevel=2)
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
                                           self.loopcheck, self._model_loss)

    # ------------------------------------------------------------------ the core's records
    def _on_action(self, a: Action) -> None:
        if self.on_reset is not None and a.kind in ("skip", "rollback"):
            self.on_reset(a)

    # ------------------------------------------------------------------ public API
    def step(self, loss: torch.Tensor | float | None = None, *,
             closure: Callable[[], Any] | None = None, sample_ids: Any = None,
             sample_losses: Any = None) -> bool:
        """Measure, decide and apply (or skip) the optimizer update. Returns True when the
        update was applied. Raises :class:`TrainingUnstable` when repairs are exhausted.

        ``loss`` is the step's loss (a scalar tensor, no sync needed); ``None`` when the loop
        cannot show it (then the losses given to :meth:`observe_loss` since the last step are
        used; without those, the loss the model returned in this step's training forwards, when
        it returns one, as nanoGPT's ``(logits, loss)`` or a Hugging Face output's ``.loss``
        (:mod:`trainguard.model_loss`); without either, the loss-based detectors sit the step
        out).

        ``closure``: for an optimizer that evaluates the loss several times per step
        (``torch.optim.LBFGS``, whose ``step`` requires one), the closure it calls (it zeroes
        the gradients, computes the loss, calls backward and returns the loss). The Guard
        measures and decides on the first evaluation's gradients: yours when ``loss`` is
        given (you called the closure already), else the Guard calls it once; the optimizer's
        first call then returns that loss instead of evaluating it again. Other optimizers
        are stepped without it.

        ``sample_ids``: the batch's dataset indices or row keys (a 1-D tensor, array, list or
        range), ``sample_losses``: optionally its per-row losses (``reduction="none"``), in the
        same order. Held by reference and read only when the step is judged bad (a non-finite
        loss or gradient, a loss spike, a gradient explosion): then the findings quote them,
        :attr:`bad_batches` records them with the rows to blame, and with ``checkpoint_dir``
        the file ``bad_samples.json`` there lists them for a resumed run to skip
        (:mod:`trainguard.samples`)."""
        if sample_ids is not None or sample_losses is not None:
            self.core.samples.offer(self.core.step_count, sample_ids, sample_losses)
        if closure is None:
            return self._step(loss)
        if not callable(closure):
            raise TypeError(f"closure must be callable (it returns the loss), got "
                            f"{type(closure).__name__}")
        if loss is not None:
            return self._closure_step(loss, loss, closure)
        with torch.enable_grad():
            first = closure()
        return self._closure_step(closure_loss(first), first, closure)

    def _closure_step(self, loss: Any, first: Any, closure: Callable[[], Any]) -> bool:
        """A step whose first evaluation (``first``, what the closure returned; ``loss``, the
        Guard's reading of it) is already in the gradients."""
        self.executor.closure = ReuseFirst(first, closure)
        try:
            return self._step(loss)
        finally:
            self.executor.closure = None

    def _step(self, loss: Any) -> bool:
        if len(self.optimizer.param_groups) != self._n_groups:
            self._param_groups_changed()
        ex = self.executor
        if ex.needs_closure and ex.closure is None and not ex.outside:
            raise TypeError(CLOSURE_NEEDED.format(type(self.optimizer).__name__))
        loss = self._loss_for_step(loss)
        self.core.take_turn()
        step = self.core.step_count
        self.loopcheck.before(step)
        if self._deferred is not None:
            if not self.snapshots.snaps and self.core.rollbacks == 0:
                self.executor.snapshot(step)  # before any update (verified)
            applied = self._deferred.step(loss, step)
        else:
            applied = self._finish(self._decide(loss))
        self.loopcheck.after(step)
        return self._end_step(applied)

    def decide_step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Everything :meth:`step` does except the optimizer's own update, for a framework that
        takes that step itself right after (the adapters' seam): measure, detect, repair
        (skip, clip, LR backoff, rollback, halt). Returns True when the framework must apply
        the update, inside ``with guard.applying():``; False when it must not (a skip or a
        rollback). A GradScaler given to the Guard is never stepped or updated here: the
        framework's scaler protocol stays the framework's."""
        if self._deferred is not None:
            raise RuntimeError("decide_step needs Guard(sync=True): the decision is taken on the "
                               "host before the framework's step")
        self.executor.outside = True
        try:
            return self.step(loss)
        finally:
            self.executor.outside = False

    def applying(self) -> contextlib.AbstractContextManager[None]:
        """Around the framework's own ``optimizer.step()`` after :meth:`decide_step` returned
        True: the Guard's LR scale is in force and the step is not taken for a foreign one."""
        return self.executor.applying()

    def observe(self, loss: torch.Tensor | float | None = None) -> list[Finding]:
        """Observe-only: measure the gradients as they are, detect and report, and return this
        step's findings; never call ``optimizer.step()``, never touch the gradients, the
        weights or the learning rate (for stacks that must keep their own step: DeepSpeed, a
        custom trainer). A GradScaler's gradients are read scaled and their norms divided by
        the scale. Call it once per optimizer step, after the backward pass and before the
        step."""
        if len(self.optimizer.param_groups) != self._n_groups:
            self._param_groups_changed()
        loss = self._loss_for_step(loss)
        self.core.take_turn()
        d = self._decide(loss, observe=True)
        step = self.core.step_count
        self.lr.tick(troubled=d.severe)
        self.executor.after_step(d.stats, False, d.severe, step, snapshot=False)
        self.probe.last_grads = []  # as in _end_step: the gradients are the user's to free
        self.core.step_count += 1
        self.measure.arm_if_due(self.core.step_count)
        return d.findings

    def observe_loss(self, loss: torch.Tensor | float, *, sample_ids: Any = None,
                     sample_losses: Any = None) -> None:
        """Show the Guard a loss it would not otherwise see (a framework that calls
        ``optimizer.step()`` itself): call it once per micro-batch with that micro-batch's loss
        as computed (not divided by the accumulation factor); the next step uses their mean.
        ``sample_ids`` / ``sample_losses``: the micro-batch's ids and per-row losses, as for
        :meth:`step`; without per-row losses a bad step names the micro-batch whose loss is
        non-finite or 2.5x the next highest."""
        self._check_loss(loss)
        if sample_ids is not None or sample_losses is not None:
            self.core.offer_samples(self.core.step_count, sample_ids, sample_losses, loss)
        self._note_loss_kind(loss)
        self._observed.append(loss.detach().reshape(()) if isinstance(loss, torch.Tensor)
                              else float(loss))

    def close(self) -> None:
        """Flush the sinks (prints the summary on the console) and remove hooks."""
        if self._closed:
            return
        if self._deferred is not None:
            self._deferred.drain()
        if self.core.step_count > 0:
            self._final_check()
        self._detach()
        self.core.close(self.summary())
        self._write_report()

    def _write_report(self) -> None:
        """The HTML report of ``report=`` (after the sinks closed: the log is complete). A
        report that cannot be written never breaks training: the reason is printed."""
        if self.core.report_path is None:
            return
        try:
            self.save_html(self.core.report_path)
        except Exception as e:  # noqa: BLE001 - a report must never break training
            warnings.warn(f"trainguard: the run report {self.core.report_path} was not written "
                          f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)

    def _final_check(self) -> None:
        """At close, one read of parameters, optimizer state and buffers: a run never ends on
        state corrupted since the last check (issue #12: faults in the last steps before a
        parameter check left Inf or 1e33 weights). Corrupted state is reported and the newest
        verified snapshot restored (with a ``rollback`` action); with none held, the finding
        says so."""
        from .detect.nonfinite import NonFiniteDetector
        step = self.core.step_count
        stats, _ = self.measure.measure(None, step, scaled=False, lr=None, force_params=True)
        bad = (not stats.params_finite or stats.huge_param_modules
               or stats.nonfinite_optimizer_modules or stats.nonfinite_buffers)
        if not bad:
            return
        findings = NonFiniteDetector().update(stats)
        for found in findings:
            self.core.emit(found)
        f = findings[0] if findings else None
        snap = self.snapshots.choose(before_step=step - 1)
        if f is not None and snap is not None and f.origin != "buffers":
            self.snapshots.restore(snap, at_step=step)
            self.core.rollbacks += 1
            self.core.act("rollback", f"at close: {f.kind} ({f.origin}): restored the verified "
                                      f"snapshot of step {snap.step}", step=step,
                          to_step=snap.step, finding=f.kind)

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
        self.core.event("run_resumed", step=self.core.step_count)  # the log's run continues

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)
        self.lr.load_state_dict(state["lr"])
        if (self.clipper is not None and state.get("clip") is not None
                and state.get("clip_type", type(self.clipper).__name__) == type(self.clipper).__name__):
            # statistics of another kind of clipper (the run resumed with a new clip=) do not apply
            self.clipper.load_state_dict(state["clip"])

    # ------------------------------------------------------------------ internals
    def observe_samples(self, sample_ids: Any, sample_losses: Any = None) -> None:
        """The ids (and optionally per-row losses) of one (micro-)batch of the coming step, for
        a framework that shows the Guard the loss itself (Lightning's ``GuardCallback``, the
        Hugging Face adapters, ``GuardedOptimizer``): call it in ``training_step`` /
        ``compute_loss``; the same as ``step``'s ``sample_ids`` / ``sample_losses``."""
        self.core.offer_samples(self.core.step_count, sample_ids, sample_losses)

    def _check_loss(self, loss: Any) -> None:
        if self._closed:
            raise RuntimeError("this Guard was closed; create a new one to keep training")
        if type(loss) is not torch.Tensor:  # else the common step: a plain tensor
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
        summed = False
        if self._model_loss.armed:
            if loss is not None or seen:
                self._model_loss.remove()  # the loop shows the loss: no hook needed
            else:
                seen, kind, summed = self._model_loss.take()  # the loss the model returned
                if self._kind_wanted():
                    self._loss_kind[0] = kind
                if not self._kind_wanted():
                    self._model_loss.kind_of = None  # decided: no more graph walks
        self._note_loss_kind(loss)
        if loss is not None or not seen:
            return loss
        if all(isinstance(v, float) for v in seen):
            return sum(seen) / len(seen)
        dev = self.probe.device
        stacked = torch.stack([v.to(dev, torch.float32) if isinstance(v, torch.Tensor)
                               else torch.tensor(v, device=dev) for v in seen])
        return stacked.sum() if summed else stacked.mean()

    def _end_step(self, applied: bool) -> bool:
        # the gradients measured this step are the user's to free (zero_grad(set_to_none=True)):
        # held here, they stayed alive through the next forward and backward (one extra copy
        # of every gradient at the memory peak)
        self.probe.last_grads = []
        self.last_step_applied = applied
        self.core.step_count += 1
        self.measure.arm_if_due(self.core.step_count)
        if self.checkpoint_every is not None and self.core.step_count % self.checkpoint_every == 0:
            self._checkpoint_due = True
        if self._checkpoint_due:
            self._checkpoint_due = self.save_checkpoint() is None  # deferred: try the next step
        return applied

    # ------------------------------------------------------------------ healthy state, checkpoints
    @property
    def healthy(self) -> bool:
        """True when the state is good to save: weights, optimizer state and buffers finite and
        not huge (one read of them, at most once per step: ask it right before a save), not
        halted, and no severe finding left unanswered in the last 10 steps. Under FSDP each rank
        checks its own shard: ask on every rank. Use it to refuse or defer your own saves::

            if step % 1000 == 0 and guard.healthy:
                torch.save(model.state_dict(), path)
        """
        self._drain_pending()
        step = self.core.step_count
        if self._health is not None and self._health[0] == step:
            return self._health[1]
        ok = self.core.settled(step) and self.check_state()
        if ok:
            self.core.good_state(step)
        self._health = (step, ok)
        return ok

    def check_state(self) -> bool:
        """One read of the weights, optimizer state and buffers: all finite, weights below
        1e15 in magnitude and optimizer state below 1e15 (the fault campaign's bounds)."""
        from .measure import HUGE_STATE, HUGE_WEIGHT
        return self.snapshots.verify(HUGE_WEIGHT, HUGE_STATE)

    def save_checkpoint(self, path: str | os.PathLike | None = None, *,
                        extra: dict[str, Any] | None = None) -> str | None:
        """Write a checkpoint (model, optimizer, scaler, Guard state, CPU RNG; atomically, with
        ``torch.save``) to ``path``, or into ``checkpoint_dir`` keeping the newest
        ``checkpoints``, only if :attr:`healthy`. Returns the path written, or None when the run
        is unhealthy (nothing written, the previous checkpoints untouched: an event
        ``checkpoint_deferred`` says so). Load with :func:`trainguard.load_checkpoint`."""
        if path is None and self.checkpoint_store is None:
            raise ValueError("save_checkpoint needs a path, or Guard(checkpoint_dir=...)")
        step = self.core.step_count
        if not self.healthy:
            if self._deferred_at != step:
                self.core.event("checkpoint_deferred", step=step,
                                message="state unhealthy: checkpoint not written (the previous "
                                        f"ones are kept; last good step {self.core.last_good_step})")
                self._deferred_at = step
            return None
        state = self.state_dict()
        if path is not None:
            from .remedies.checkpoint import save_checkpoint
            out = save_checkpoint(path, self.model, self.optimizer, self.scaler, step=step,
                                  guard_state=state, extra=extra)
        else:
            assert self.checkpoint_store is not None
            out = self.checkpoint_store.save(step, self.model, self.optimizer, self.scaler,
                                             state, extra)
        self.core.event("checkpoint", step=step, path=out)
        return out

    def save_bad_samples(self, path: str | os.PathLike) -> str:
        """Write the run's bad batches and the sample ids they name to ``path`` (JSON,
        atomically; read it back with :func:`trainguard.load_bad_samples`). With
        ``checkpoint_dir`` the Guard keeps ``bad_samples.json`` there up to date by itself."""
        return self.core.samples.save(path)

    def _detach(self) -> None:
        """Remove every hook this Guard put on the model and the optimizer."""
        self._closed = True
        self._finalizer()

    def _infer_chance(self, first_loss: float) -> float | None:
        return chance_level(self.model, first_loss, kind=self._loss_kind[0])

    def _note_loss_kind(self, loss: Any) -> None:
        """Until the chance level is decided: what the loss's graph says it is (one walk of
        the loss function's few top nodes, at most once per step, usually once per run)."""
        if self.core.chance_option == "auto" and self._loss_kind[0] is None \
                and isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
            self._loss_kind[0] = graph_kind(loss)

    def _kind_wanted(self) -> bool:
        """The chance level is still to be decided from a loss's graph."""
        return self.core.chance_option == "auto" and self._loss_kind[0] is None

    def _release_capture(self) -> None:
        if self._capture is not None:
            self._capture.release()

    def _locate(self, findings: list[Finding], stats: StepStats) -> list[Finding]:
        """The core's locate hook: name the first module of a non-finite value."""
        if self._capture is None or not findings or not any(f.kind == "nonfinite" for f in findings):
            self._release_capture()
            return findings
        try:
            out = [self._capture.refine(f, self.model, stats) if f.kind == "nonfinite" else f
                   for f in findings]
        except Exception as e:  # locating must never break training
            self.core.event("locate_failed", step=stats.step, error=f"{type(e).__name__}: {e}")
            out = findings
        self._capture.release()
        return out

    def _decide(self, loss: Any, observe: bool = False) -> "_Decision":
        """Measure, detect, locate, record the findings and ask the policy: everything up to
        the plan, nothing carried out yet."""
        step = self.core.step_count
        ex = self.executor
        if not observe and not self.snapshots.snaps and self.core.rollbacks == 0:
            ex.snapshot(step)  # before any update: the last-resort rollback (verified)
        scaled = False if observe else ex.scaler_ready()
        divide = ex.scale_divisor() if observe else None
        stats, grads = self.measure.measure(loss, step, scaled=scaled, lr=ex.current_lr(),
                                            divide=divide)
        if self.restructurer is not None and stats.activations and self._capture is not None \
                and self._capture.args and isinstance(self._capture.args[0], torch.Tensor):
            # LSUV re-initialises from a batch: this step's input, kept past the release
            self._last_input = self._capture.args[0].detach()
        self.core.history.append(stats)
        findings, plan, severe = self.core.run(stats, infer_chance=self._infer_chance,
                                               refine=self._locate, plan=not observe)
        return _Decision(stats, grads, scaled, plan, findings, severe)

    def _finish(self, d: "_Decision") -> bool:
        """Carry out a decision: remedies, then the optimizer step (or not)."""
        step = self.core.step_count
        if self.restructurer is not None and "halt" not in d.plan.kinds() \
                and self._restructure(d, step):
            self.lr.tick(troubled=True)
            self.executor.after_step(d.stats, False, True, step, snapshot=False)
            return False
        applied = self.executor.execute(d.plan, d.stats, d.grads, d.scaled, step)
        self.lr.tick(troubled=d.severe)
        self.executor.after_step(d.stats, applied, d.severe, step)
        return applied

    def _restructure(self, d: "_Decision", step: int) -> bool:
        """Policy(structural="repair"): change the live model for a structural finding (see
        :mod:`trainguard.remedies.structure`). True when it did (this step's update, computed
        for the old structure, is not applied)."""
        from .remedies.structure import needs_code
        rs = self.restructurer
        f = rs.pick(d.findings)
        if f is None:
            return False
        why = needs_code(f, self.model)
        if why is not None:
            if why not in rs.reported_code:
                rs.reported_code.add(why)
                self.core.event("restructure_needs_code", step=step, finding=f.kind,
                                message=why)
            return False
        remedy = rs.next_remedy(f)
        if remedy is None:
            self.executor.finish_scaler_step(d.scaled)
            self.executor.halt(f"structural repair exhausted for {f.kind} "
                               f"({rs.changes} changes tried)", f, step)
        assert remedy is not None
        self.executor.finish_scaler_step(d.scaled)
        batch, self._last_input = self._last_input, None
        changes = rs.apply(f, remedy, batch)
        from .remedies.structure import CAUSED, OPTIMIZER_ONLY, STRUCTURAL, cause_of
        if (f.kind, cause_of(f)) not in CAUSED:
            # what the structural detectors saw describes the old structure (a weight decay
            # turned on for a logit drift changes nothing they saw)
            self.core.forget_detectors(STRUCTURAL)
        if remedy not in OPTIMIZER_ONLY:
            # a changed model starts from another loss and gradient scale: the spike windows
            # describe the old one (a swapped-in GRU's first loss was a "spike" of the RNN's)
            self.core.reset_detectors()
        self._changed(f, remedy, changes, step)
        return True

    def _changed(self, f: Finding, remedy: str, changes: list[str], step: int) -> None:
        """After a structural change: what the snapshots held describes the old structure (a
        fresh verified one is taken), the probes watch the new one closely, and the change is
        an action."""
        self.sampler.refresh()
        self.snapshots.clear()
        self.executor.snapshot(step + 1)
        self.measure.watch(step)  # probe the new structure at once, then often
        where = f" at {f.where}" if f.where else ""
        assert self.restructurer is not None
        self.core.act("restructure", f"{f.kind}{where}: {remedy}: "
                      + ("; ".join(changes) if changes else "nothing to change"), step=step,
                      finding=f.kind, remedy=remedy, changes=changes, where=f.where,
                      attempt=self.restructurer.tried[self.restructurer.key(f)])

    def _rebind(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A structural repair replaced parameters (a recurrent cell swap): each new one takes
        its old one's place in the probe's parameter list (shared with the snapshots and the
        loop check), so names, module grouping and order stay as they were."""
        new_of = {id(o): n for o, n in pairs}
        params = self.probe.params
        for i, p in enumerate(params):
            if id(p) in new_of:
                params[i] = new_of[id(p)]
        self.probe.last_grads = []
        self.measure.rebind()

    def _param_groups_changed(self) -> None:
        """``optimizer.add_param_group`` since the probe was built (gradual unfreezing, a
        fine-tuning recipe that adds the backbone later): the new parameters were neither
        measured nor in the snapshots, so a rollback could not repair them (a NaN written into
        one was rolled back 8 times and halted the run). The probe is rebuilt over the
        optimizer's parameters as they are now; the snapshots, laid out for the old list, are
        replaced by one of the present (verified) state."""
        from .stats import Probe
        old = self.probe
        new = Probe(self.model, self.optimizer, sharded=old.sharded,
                    process_group=old.process_group)
        self._n_groups = len(self.optimizer.param_groups)
        self.measure.probe = self.probe = new
        self.measure.rebind()
        self.loopcheck.params = new.params
        self.loopcheck._first = 0
        self.snapshots.params = new.params
        self.snapshots.snaps = []
        step = self.core.step_count
        before = set(old.modules)
        added = [m for m in new.modules if m not in before]
        self.core.event("param_groups_changed", step=step, groups=self._n_groups,
                        tensors=len(new.params), added_modules=added,
                        message=f"the optimizer now has {self._n_groups} parameter groups "
                                f"({len(new.params)} tensors, {len(new.params) - len(old.params)}"
                                f" new{': ' + ', '.join(added[:5]) if added else ''}): "
                                "measured and snapshotted from this step on")
        self.executor.snapshot(step)

    def _rescue(self, f: Finding, step: int) -> bool:
        """Policy(structural="repair"), rollbacks exhausted: before halting, try the
        structural remedy for a network that blows up however far it is rolled back (see
        :func:`~trainguard.remedies.structure.rescue_menu`). True when a change was made: the
        rollback budget and the learning-rate scale start over with the new structure."""
        from .remedies.structure import rescue_menu
        rs = self.restructurer
        if rs is None:
            return False
        options = rescue_menu(f, self.model)
        i = rs.tried.get(f.kind, 0)
        if i >= len(options) or rs.changes >= rs.max_changes:
            return False
        remedy = options[i]
        changes = rs.apply(f, remedy, None)
        if not changes:
            return False
        core = self.core
        core.rollback_base = core.rollbacks
        core.reset_detectors()
        self.lr.scale = self.lr.ceiling = 1.0  # the cuts answered the old structure
        self._changed(f, remedy, changes, step)
        return True

    def undo_restructure(self) -> bool:
        """Put back the model and optimizer state from just before the last ``restructure``
        action. Returns False when there is nothing to undo."""
        if self.restructurer is None or not self.restructurer.restore():
            return False
        self.sampler.refresh()
        self.snapshots.clear()
        self.core.act("restructure", "undo: the model and optimizer state from before the last "
                                     "change are back", undo=True)
        return True

    def _drain_pending(self) -> None:
        """Read every step whose statistics are still in flight (sync=False)."""
        if self._deferred is not None:
            self._deferred.drain()

    def __repr__(self) -> str:
        return (f"Guard(model={type(self.model).__name__}, optimizer={type(self.optimizer).__name__}, "
                f"clip={self.clipper!r}, sync={self.sync}, policy={self.policy!r})")
