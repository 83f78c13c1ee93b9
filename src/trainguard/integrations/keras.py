"""Keras 3: ``Guard``, a callback for ``model.fit`` and a one-line guard for GradientTape loops.

    from trainguard.integrations.keras import Guard
    guard = Guard()
    model.compile(optimizer=guard.wrap(keras.optimizers.Adam(1e-3)), loss="mse")
    model.fit(x, y, epochs=5, callbacks=[guard])

    # a custom loop (the GradientTape loop):
    applied = guard.apply_gradients(optimizer, zip(grads, model.trainable_variables), loss)

Same detectors, policy, finding and action kinds as the torch Guard (one
:class:`~trainguard.core.DecisionCore`); ``guard.findings``, ``guard.actions``, ``guard.summary()``.

How it acts under ``model.fit`` (whose train step is a compiled graph): the wrapped optimizer, shaped
like Keras' own ``LossScaleOptimizer``, measures every gradient's norm with ``keras.ops``, clips to
a threshold the host sets, and applies the inner optimizer's update only when every gradient is
finite (``ops.cond``): a non-finite update never reaches the weights, and the inner optimizer's
``iterations`` and moments stay untouched. The callback reads the step's statistics (one small
transfer) in ``on_train_batch_end`` and runs the detectors and the policy there: LR backoff (the
inner optimizer's learning rate, a schedule included), rollback (the model's variables and the
optimizer's, from an in-memory snapshot verified finite), halt (``TrainingUnstable`` out of
``fit`` with the story). A loss spike is therefore seen after its update, as with the torch Guard's
``sync=False``; ``apply_gradients`` in a custom loop decides before the update (skip included).

Backends: TensorFlow and PyTorch (the tests run both). JAX's ``fit`` uses stateless optimizer
updates, which this wrapper does not implement; tf.distribute strategies are not supported.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

try:
    import keras
    from keras import ops
    from keras.src import backend as _kbackend
except ImportError as e:  # pragma: no cover
    raise ImportError("trainguard.integrations.keras needs Keras 3: pip install 'trainguard[keras]'") from e

from ..core import CoreView, calm_limit, check_int
from ..detect import Detector
from ..policy import Policy
from ..sinks.base import Sink
from ..types import Finding, StepStats, TrainingUnstable

if int(keras.__version__.split(".")[0]) != 3:  # pragma: no cover
    raise ImportError(f"trainguard.integrations.keras supports Keras 3, found {keras.__version__}")

HUGE_WEIGHT = 1e15  # as trainguard.measure.HUGE_WEIGHT


class _ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The user's schedule times the Guard's LR scale (a variable the host sets)."""

    def __init__(self, inner: Any, scale: Any) -> None:
        self.inner, self.scale = inner, scale

    def __call__(self, step: Any) -> Any:
        return ops.multiply(ops.cast(self.inner(step), "float32"), self.scale)

    def get_config(self) -> dict:
        return {"inner": keras.saving.serialize_keras_object(self.inner)}


class GuardedOptimizer(keras.optimizers.Optimizer):
    """``inner`` with the Guard's veto and clip inside its update (see the module docstring).
    Made by :meth:`Guard.wrap`."""

    def __init__(self, inner: keras.optimizers.Optimizer, name: str | None = None) -> None:
        super().__init__(learning_rate=0.0, name=name or f"guarded_{inner.name}")
        self.inner_optimizer = inner
        #: the batch's loss, written by the model's compute_loss (fit's logs carry the epoch's
        #: running mean, which a single NaN batch poisons for the rest of the epoch)
        self.tg_loss = keras.Variable(np.float32(np.nan), trainable=False, dtype="float32",
                                      name="tg_loss")
        self._lr_scale_value = 1.0
        #: positions of the variables whose gradient was None when the step was traced
        self.tg_missing: tuple[int, ...] = ()
        self._schedule = isinstance(inner._learning_rate,
                                    keras.optimizers.schedules.LearningRateSchedule)

    def build(self, var_list: list) -> None:
        n = len(var_list)
        # [norm of each gradient..., applied (1/0), the batch's loss]: the one vector the host
        # reads per step
        self.tg_stats = self.add_variable(shape=(n + 2,), dtype="float32",
                                          initializer="zeros", aggregation="none", name="tg_stats")
        self.tg_threshold = self.add_variable(shape=(), dtype="float32", initializer="ones",
                                              aggregation="none", name="tg_threshold")
        self.tg_threshold.assign(np.float32(np.finfo(np.float32).max))
        self.tg_lr_scale = self.add_variable(shape=(), dtype="float32", initializer="ones",
                                             aggregation="none", name="tg_lr_scale")
        if self._schedule:
            self.inner_optimizer._learning_rate = _ScaledSchedule(
                self.inner_optimizer._learning_rate, self.tg_lr_scale)
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self) -> list:
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        self.inner_optimizer.learning_rate = value

    @property
    def iterations(self) -> Any:
        """The inner optimizer's counter: applied updates only."""
        return self.inner_optimizer.iterations

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        if not self.built:  # type: ignore[has-type]
            with _kbackend.name_scope(self.name, caller=self):
                self.build(list(trainable_variables or []))
            self.built = True
        grads = list(grads)
        # a variable the loss does not reach has no gradient (None): Keras's own ``apply``
        # leaves it out with a warning; here its norm is a 0.0 placeholder (the vector keeps
        # one entry per variable) and the host is told which (known when the step is traced)
        self.tg_missing = tuple(i for i, g in enumerate(grads) if g is None)
        norms = ops.stack([ops.sqrt(ops.sum(ops.square(ops.cast(g, "float32"))))
                           if g is not None else ops.zeros((), "float32") for g in grads])
        finite = ops.all(ops.isfinite(norms))
        total = ops.sqrt(ops.sum(ops.square(norms)))
        coef = ops.minimum(1.0, ops.divide(self.tg_threshold, total + 1e-6))
        coef = ops.where(ops.isfinite(coef), coef, ops.ones_like(coef))

        loss = ops.reshape(ops.convert_to_tensor(self.tg_loss), (1,))

        def handle_finite() -> None:
            self.inner_optimizer.apply([ops.multiply(g, ops.cast(coef, g.dtype))
                                        if g is not None else None for g in grads],
                                       trainable_variables=trainable_variables)
            self.tg_stats.assign(ops.concatenate([norms, ops.ones((1,), "float32"), loss]))

        def handle_non_finite() -> None:
            self.tg_stats.assign(ops.concatenate([norms, ops.zeros((1,), "float32"), loss]))

        ops.cond(finite, handle_finite, handle_non_finite)

    def get_config(self) -> dict:
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}


def _layers(variables: Sequence[Any]) -> tuple[list[str], np.ndarray]:
    """The layer of each variable (``sequential/dense/kernel`` -> ``sequential/dense``, as the
    torch side groups parameters by module): unique names and each variable's index in them."""
    names: list[str] = []
    index: dict[str, int] = {}
    of = []
    for v in variables:
        n = str(getattr(v, "path", None) or getattr(v, "name", "var"))
        n = n.rsplit("/", 1)[0] if "/" in n else n
        if n not in index:
            index[n] = len(names)
            names.append(n)
        of.append(index[n])
    return names, np.asarray(of, dtype=np.int64)


def _group(norms: np.ndarray, of: np.ndarray, n: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sqrt(np.bincount(of, weights=np.square(norms), minlength=n))


def _is_lr(var: Any) -> bool:
    return str(getattr(var, "path", None) or getattr(var, "name", "")).endswith("learning_rate")


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x), dtype=np.float64)


class Guard(CoreView, keras.callbacks.Callback):
    """trainguard for Keras 3 (see the module docstring).

    Args:
        policy, clip, detectors, sinks, keep_records, chance_loss: as for
            :class:`trainguard.Guard` (``clip``: ``"adaptive"``, a number, ``None``).
        snapshot_every, snapshots: rollback snapshots (model and optimizer variables, in host
            memory, verified finite) every this many steps, this many kept.
        param_norm_every: weight norms every this many steps.
        console, log: print interventions / a JSONL event log.
        judge_loss: as for :class:`trainguard.Guard` (``"auto"``: the loss-progress rules go
            off once this Guard's steps and another guarded run's take turns, a GAN's).
    """

    def __init__(self, *, policy: Policy | None = None, clip: Any = "adaptive",
                 detectors: Sequence[Detector] | None = None, snapshot_every: int = 100,
                 snapshots: int = 2, param_norm_every: int = 10,
                 chance_loss: float | None = None, console: bool = False, log: str | None = None,
                 sinks: Iterable[Sink] = (), keep_records: int = 10_000,
                 judge_loss: bool | str = "auto") -> None:
        super().__init__()
        self._init_core(policy=policy, detectors=detectors, clip=clip, console=console, log=log,
                        sinks=sinks, keep_records=keep_records, chance_loss=chance_loss,
                        who="the Keras Guard", judge_loss=judge_loss)
        self.snapshot_every = check_int("snapshot_every", snapshot_every)
        self.keep = check_int("snapshots", snapshots)
        self.param_norm_every = check_int("param_norm_every", param_norm_every)
        self.optimizer: GuardedOptimizer | None = None
        self._snaps: list[tuple[int, list[np.ndarray], list[np.ndarray]]] = []
        self._lr_written: float | None = None
        self._lr_base: float | None = None
        self._scale_written = 1.0

    # -- model.fit ------------------------------------------------------------------------------
    def wrap(self, optimizer: Any) -> GuardedOptimizer:
        """The optimizer to compile with: ``optimizer``'s update, vetoed and clipped inside."""
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"Guard.wrap expects a keras.optimizers.Optimizer, got "
                            f"{type(optimizer).__module__}.{type(optimizer).__name__}")
        if isinstance(optimizer, GuardedOptimizer):
            raise TypeError("the optimizer is already wrapped by a trainguard Guard")
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise ValueError("the Keras Guard does not support gradient_accumulation_steps "
                             "(the update it judges would be the accumulated one)")
        self.optimizer = GuardedOptimizer(optimizer)
        return self.optimizer

    def on_train_begin(self, logs: dict | None = None) -> None:
        opt = self.optimizer
        if opt is None or getattr(self.model, "optimizer", None) is not opt:
            raise ValueError("compile the model with guard.wrap(optimizer) to use the Guard as a "
                             "callback: model.compile(optimizer=guard.wrap(Adam(...)), ...)")
        assert opt is not None
        model = self.model
        if "compute_loss" not in model.__dict__:
            orig = model.compute_loss
            sink = opt.tg_loss

            def compute_loss(*args: Any, **kwargs: Any) -> Any:
                loss = orig(*args, **kwargs)
                sink.assign(ops.cast(ops.convert_to_tensor(loss), "float32"))
                return loss
            model.compute_loss = compute_loss  # the batch's loss, before any running mean
        if not self._snaps and self.core.rollbacks == 0:
            # before the first update (the optimizer builds its variables at its first apply:
            # a rollback to this snapshot resets them to their initial zeros)
            self._snapshot_now(0, model.variables, opt.variables if opt.built else [])

    def on_train_end(self, logs: dict | None = None) -> None:
        self.model.__dict__.pop("compute_loss", None)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        opt = self.optimizer
        assert opt is not None
        model = self.model
        variables = list(model.trainable_variables)
        self.core.take_turn()
        t = self.core.step_count
        v = _to_numpy(opt.tg_stats)  # the step's one transfer
        gn, applied, loss = v[:-2], bool(v[-2] > 0.5), float(v[-1])
        stats = self._stats(t, loss, gn, variables, missing=opt.tg_missing)
        plan, findings, severe = self._decide(stats)
        if not applied and not stats.grads_finite:
            self.core.act("skip", "nonfinite: update not applied inside the optimizer (weights, "
                                  "moments and iterations untouched)", step=t, finding="nonfinite")
        if applied and self.clipper is not None and stats.grads_finite:
            thr = self.clipper.threshold()
            self.clipper.coefficient(stats.grad_norm)
            if stats.grad_norm > thr:
                self.core.act("clip", f"{self.clipper.name} clipping (in the optimizer): gradient "
                                      f"norm {stats.grad_norm:.4g} -> {thr:.4g}", step=t,
                              norm=stats.grad_norm, threshold=thr)
            opt.tg_threshold.assign(np.float32(min(self.clipper.threshold(),
                                                   float(np.finfo(np.float32).max))))
        try:
            self._late(plan, t, model.variables, opt.variables, opt.inner_optimizer)
        except TrainingUnstable:
            model.stop_training = True
            raise
        self.lr.tick(troubled=severe)
        self._after(stats, applied and "rollback" not in plan.kinds(), t, model.variables,
                    opt.variables)

    # -- the GradientTape loop --------------------------------------------------------------------
    def apply_gradients(self, optimizer: Any, grads_and_vars: Iterable[tuple[Any, Any]],
                        loss: Any, *, sample_ids: Any = None, sample_losses: Any = None) -> bool:
        """In place of ``optimizer.apply_gradients(grads_and_vars)``: judge the update first.
        Returns whether it was applied. Raises ``TrainingUnstable`` when repairs run out.
        ``sample_ids`` / ``sample_losses``: the batch's row ids and per-row losses, read only
        on a bad step (``guard.bad_batches``, see :mod:`trainguard.samples`)."""
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"apply_gradients expects a keras.optimizers.Optimizer, got "
                            f"{type(optimizer).__name__}")
        pairs = list(grads_and_vars)
        if not pairs or any(not isinstance(p, tuple) or len(p) != 2 for p in pairs):
            raise ValueError("grads_and_vars must be (gradient, variable) pairs, as "
                             "zip(grads, model.trainable_variables) gives")
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        # a variable the loss does not reach has no gradient (None): as in ``fit``, its norm is
        # a 0.0 placeholder, its layer is named when none of its variables had one, and the
        # None goes on to the optimizer, which leaves it out with Keras' warning
        missing = tuple(i for i, g in enumerate(grads) if g is None)
        if len(missing) == len(grads):
            raise ValueError("no variable has a gradient: check that the loss depends on "
                             "the variables given (tape.gradient(loss, model.trainable_variables))")
        for g, var in zip(grads, variables):
            if g is not None and tuple(g.shape) != tuple(var.shape):
                raise ValueError(f"the gradient for {getattr(var, 'path', var)} has shape "
                                 f"{tuple(g.shape)}, expected {tuple(var.shape)}")
        self.core.take_turn()
        t = self.core.step_count
        if sample_ids is not None or sample_losses is not None:
            self.core.offer_samples(t, sample_ids, sample_losses)
        opt_vars = list(optimizer.variables)
        if not self._snaps and self.core.rollbacks == 0:
            self._snapshot_now(t, variables, opt_vars)
        norms = ops.stack([ops.sqrt(ops.sum(ops.square(ops.cast(g, "float32"))))
                           if g is not None else ops.zeros((), "float32") for g in grads])
        gn = _to_numpy(norms)
        lv = float(_to_numpy(loss).reshape(()))
        stats = self._stats(t, lv, gn, variables, missing=missing)
        plan, findings, severe = self._decide(stats)
        by = dict(plan.actions)
        skip = self._late(plan, t, variables, opt_vars, optimizer)
        applied = not skip
        if applied and "skip" in by:
            f = by["skip"]
            self.core.act("skip", f"{f.kind}: update not applied (weights, moments and "
                                  "iterations untouched)", step=t, finding=f.kind)
            applied = False
        if applied:
            coef = self.core.clip_scale(self.clipper, by.get("clip"), stats.grad_norm, t)
            if coef < 1.0:
                grads = [ops.multiply(g, ops.cast(coef, g.dtype)) if g is not None else None
                         for g in grads]
            optimizer.apply_gradients(zip(grads, variables))
        self.lr.tick(troubled=severe)
        self._after(stats, applied, t, variables, list(optimizer.variables))
        return applied

    # -- shared ---------------------------------------------------------------------------------
    def _stats(self, t: int, loss: float, gn: np.ndarray, variables: list,
               missing: Sequence[int] = ()) -> StepStats:
        """``missing``: positions of the variables that had no gradient (their layer is named
        in ``missing_grad_modules`` when none of its variables had one)."""
        names, of = _layers(variables)
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.sqrt(np.sum(np.square(gn))))
        gone: tuple[str, ...] = ()
        if missing:
            skip = set(missing)
            had = {int(k) for i, k in enumerate(of) if i not in skip}
            gone = tuple(n for k, n in enumerate(names) if k not in had)
        stats = StepStats(step=t, loss=loss, grad_norm=total, modules=names,
                          grad_norms=_group(gn, of, len(names)).tolist(), optimizer="keras",
                          missing_grad_modules=gone)
        if t % self.param_norm_every == 0 or not (math.isfinite(loss) and math.isfinite(total)):
            pn = _to_numpy(ops.stack([ops.sqrt(ops.sum(ops.square(ops.cast(v, "float32"))))
                                      for v in variables]))
            gp = _group(pn, of, len(names))
            with np.errstate(over="ignore", invalid="ignore"):
                stats.param_norms = gp.tolist()
                stats.param_norm = float(np.sqrt(np.sum(np.square(pn))))
            if np.isfinite(pn).all() and stats.param_norm > HUGE_WEIGHT:
                stats.huge_param_modules = [n for n, x in zip(names, gp) if x > HUGE_WEIGHT]
        return stats

    def _decide(self, stats: StepStats) -> tuple[Any, list[Finding], bool]:
        self.core.history.append(stats)
        findings, plan, severe = self.core.run(stats)
        return plan, findings, severe

    def _late(self, plan: Any, t: int, variables: list, opt_vars: list, optimizer: Any) -> bool:
        """halt, rollback, lr_backoff; True when the step's update must not be applied."""
        core = self.core
        by = dict(plan.actions)
        if "halt" in by:
            f = by["halt"]
            raise core.halt(f"{f.kind} is configured to halt the run (policy.halt_on)", f,
                            self.lr.scale, t)
        skip = False
        if "rollback" in by:
            f = by["rollback"]
            limit = calm_limit(f, t)
            older = [s for s in self._snaps if s[0] <= limit] or self._snaps[:1]
            core.check_rollback(f, bool(older), self.lr.scale, t)
            step, saved_vars, saved_opt = older[-1]
            for var, val in zip(variables, saved_vars):
                var.assign(val)
            # the learning rate is not state to roll back: the LR controller and the user's
            # schedule own it (resetting it with the rest set it to zero: no more learning)
            if len(saved_opt) == len(opt_vars):
                for var, val in zip(opt_vars, saved_opt):
                    if not _is_lr(var):
                        var.assign(val)
            else:  # the optimizer was built after the snapshot: back to its initial state
                for var in opt_vars:
                    if not _is_lr(var):
                        var.assign(np.zeros(tuple(var.shape), dtype=np.dtype(var.dtype)))
            self._snaps = [s for s in self._snaps if s[0] <= step]
            core.rolled_back(f, t, step, f"restored the snapshot of step {step}")
            skip = True
        if "lr_backoff" in by:
            core.backoff_lr(by["lr_backoff"], self.lr, t)
        self._set_lr(optimizer)
        return skip

    def _set_lr(self, optimizer: Any) -> None:
        """Put the LR scale in force, cooperating with whoever else sets the learning rate
        (a schedule is wrapped; a plain rate changed by a callback becomes the new base)."""
        if self.optimizer is not None and optimizer is self.optimizer.inner_optimizer \
                and self.optimizer._schedule:
            self.optimizer.tg_lr_scale.assign(np.float32(self.lr.scale))
            return
        if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return  # a schedule on an unwrapped optimizer (custom loop): documented limitation
        if self._lr_written is None and self.lr.scale == 1.0:
            return  # nothing to put in force (no host read on a healthy step)
        cur = float(_to_numpy(optimizer.learning_rate))
        if self._lr_written is None or not math.isclose(cur, self._lr_written, rel_tol=1e-6):
            self._lr_base = cur / (self._scale_written if self._lr_written is not None else 1.0)
        want = self._lr_base * self.lr.scale  # type: ignore[operator]
        if self._lr_written is None or not math.isclose(want, cur, rel_tol=1e-6):
            optimizer.learning_rate = want
        self._lr_written, self._scale_written = want, self.lr.scale

    def _after(self, stats: StepStats, applied: bool, t: int, variables: list,
               opt_vars: list) -> None:
        core = self.core
        if applied:
            core.applied_steps += 1
        if core.sinks:
            core.stats(stats)
        core.step_count += 1
        if applied and t - core.last_severe > 10 and (t + 1) % self.snapshot_every == 0:
            self._snapshot_now(t + 1, variables, opt_vars)

    def _snapshot_now(self, step: int, variables: Sequence[Any], opt_vars: Sequence[Any]) -> None:
        vals = [np.array(ops.convert_to_numpy(v)) for v in variables]
        ovals = [np.array(ops.convert_to_numpy(v)) for v in opt_vars]
        ok = all(np.isfinite(a).all() and (a.size == 0 or np.abs(a).max() < HUGE_WEIGHT)
                 for a in vals if a.dtype.kind == "f")
        ok = ok and all(np.isfinite(a).all() for a in ovals if a.dtype.kind == "f")
        if not ok:
            self.core.event("snapshot_refused", step=step, reason="non-finite or huge state")
            return
        self._snaps.append((max(step, 0), vals, ovals))
        del self._snaps[:-self.keep]


__all__ = ["Guard", "GuardedOptimizer"]
