"""PyTorch Lightning 2.x: ``GuardCallback``, the Guard as a callback.

    from trainguard.integrations.lightning import GuardCallback
    guard_cb = GuardCallback()                      # any tg.Guard keyword: policy=, clip=, log=, ...
    trainer = L.Trainer(callbacks=[guard_cb], gradient_clip_val=1.0, precision="16-mixed")
    trainer.fit(model, loader)
    print(guard_cb.guard.summary())

How it reaches the update (Lightning runs the backward pass *inside* ``optimizer.step(closure)``,
so no callback hook can veto a step): at ``on_fit_start`` the callback wraps the ``step`` of the
raw torch optimizer Lightning drives (an instance attribute; removed at the end of fit). Then,
per optimizer step:

1. ``on_before_backward`` collects each micro-batch's loss (Lightning has already divided it by
   ``accumulate_grad_batches``; their sum is the window's mean loss);
2. ``on_before_optimizer_step`` (after the fp16 unscale, before Lightning's
   ``gradient_clip_val`` clipping) measures, detects and repairs: ``Guard.decide_step``;
3. the wrapped ``step`` applies the update at the Guard's LR scale, or does not (a true skip:
   parameters, moments and step counters untouched).

Works with automatic and manual optimization, ``accumulate_grad_batches``, ``"16-mixed"`` (the
precision plugin's GradScaler keeps its protocol; its own overflow skips are events, not
findings), ``"bf16-mixed"`` and DDP (the Guard all-reduces its statistics, so every rank takes
the same decision). Findings and actions are logged to the trainer's loggers as
``trainguard/...`` counters; a halt raises :class:`trainguard.TrainingUnstable` with the story
out of ``trainer.fit``; ModelCheckpoint's saves (and its rotation of old files) wait while
``guard.healthy`` is False, and any other checkpoint is refused while the weights are non-finite.

Not supported: several optimizers (the first one is guarded, with a warning; the loss-progress
rules are off, as for coupled losses: a GAN's players), ``Guard(sync=False)``
(the update is Lightning's), DeepSpeed and other strategies that step inside ``backward``
(use ``GuardCallback(observe=True)``: measure, detect, report, never act).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
    except ImportError as e:
        raise ImportError("trainguard.integrations.lightning needs Lightning 2.x: "
                          "pip install 'trainguard[lightning]'") from e

from ..guard import Guard
from ..remedies.executor import ReuseFirst
from . import check_adapter_options
from ..sinks.base import Sink
from ..types import Action, Finding

_MAJOR = int(pl.__version__.split(".")[0])
if _MAJOR != 2:  # pragma: no cover
    raise ImportError(f"trainguard.integrations.lightning supports Lightning 2.x, found "
                      f"{pl.__version__}")


class _LoggerSink(Sink):
    """Findings and actions as counters on the trainer's loggers."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.n: dict[str, int] = {}

    def _log(self, key: str, step: int) -> None:
        self.n[key] = self.n.get(key, 0) + 1
        for lg in getattr(self.trainer, "loggers", ()):
            try:
                lg.log_metrics({key: float(self.n[key])}, step=step)
            except Exception:  # noqa: BLE001 - a logger must never break training
                pass

    def on_finding(self, f: Finding) -> None:
        self._log(f"trainguard/finding/{f.kind}", f.step)

    def on_action(self, a: Action) -> None:
        self._log(f"trainguard/action/{a.kind}", a.step)


#: the ``coupled_losses`` message of a LightningModule with several optimizers
MANY_OPTIMIZERS = (
    "several optimizers: the Guard steps the first and sees the loss of every backward pass "
    "(a GAN's players, stepped in turn, whose losses are coupled and need not go down), so the "
    "rules that judge the loss's progress (plateau, slow divergence, ruin) are off; non-finite "
    "values, loss spikes, a 1e4x blow-up and gradient explosions are still judged. "
    "judge_loss=True keeps the progress rules on")


class GuardCallback(Callback):
    """The Guard for a Lightning ``Trainer``.

    Args:
        observe: measure, detect and report only: never skip, clip, change the LR or roll back
            (``Guard.observe``); for strategies whose step the Guard cannot reach.
        **guard_options: :class:`trainguard.Guard` keywords (``policy``, ``clip``, ``log``,
            ``console``, ``snapshot_every``, ...). ``scaler`` is taken from the precision
            plugin; ``sync=False`` is refused.

    ``callback.guard`` is the Guard once training has started.
    """

    def __init__(self, observe: bool = False, **guard_options: Any) -> None:
        super().__init__()
        check_adapter_options(guard_options, "GuardCallback",
                              "the trainer's precision plugin")
        self.observe = bool(observe)
        self.options = guard_options
        self.guard: Guard | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._orig_step: Any = None
        self._losses: list[torch.Tensor] = []
        self._in_step = False  # inside the optimizer's own step (LBFGS's further evaluations)
        self._go: bool | None = None
        self._own_attr: Any = None
        self._pending_state: dict[str, Any] | None = None

    # -- set-up and tear-down ---------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        opts = trainer.optimizers
        if not opts:
            raise ValueError("GuardCallback: the LightningModule configured no optimizer")
        if len(opts) > 1:
            warnings.warn("trainguard: several optimizers; only the first one is guarded",
                          RuntimeWarning, stacklevel=2)
        opt = opts[0]
        opt = getattr(opt, "_optimizer", opt)  # a LightningOptimizer wraps the raw one
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        options = dict(self.options)
        options.setdefault("console", trainer.is_global_zero)
        self.guard = Guard(pl_module, opt, scaler=scaler, **options)
        self.guard.core.sinks.append(_LoggerSink(trainer))
        if len(opts) > 1:
            # a GAN's recipe (opt_g, opt_d stepped in turn by manual optimization): every
            # backward's loss reaches the window, the players' losses coupled and mixed, which
            # the progress rules took for a stall or progress lost (a Lightning GAN's Guard
            # rolled the whole module back): they rest, as for two Guards that take turns
            self.guard.core.couple(MANY_OPTIMIZERS)
        self._opt = opt
        self._wrap_checkpointing(trainer)
        if not self.observe:
            self._own_attr = opt.__dict__.get("step")
            self._orig_step = opt.step
            opt.step = self._guarded_step  # type: ignore[method-assign]

    def _wrap_checkpointing(self, trainer: Any) -> None:
        """Defer every ModelCheckpoint save (and the rotation that comes with it) while
        ``guard.healthy`` is False, so a NaN run never rotates the last good checkpoint away.
        The save and its rotation are ModelCheckpoint's ``_save_topk_checkpoint`` /
        ``_save_last_checkpoint`` (Lightning 2.x); the state is read only when one is due."""
        self._wrapped: list[tuple[Any, str]] = []
        for cb in getattr(trainer, "checkpoint_callbacks", []) or []:
            for name in ("_save_topk_checkpoint", "_save_last_checkpoint"):
                orig = getattr(cb, name, None)
                if orig is None or name in cb.__dict__:
                    continue

                def save(trainer: Any, monitor_candidates: Any, _orig: Any = orig) -> None:
                    if self.guard is None or self.guard._closed or self.guard.healthy:
                        _orig(trainer, monitor_candidates)
                    else:
                        self.guard.core.event(
                            "checkpoint_deferred", message="state unhealthy: ModelCheckpoint save "
                            f"deferred (last good step {self.guard.last_good_step})")
                setattr(cb, name, save)
                self._wrapped.append((cb, name))

    def _restore(self) -> None:
        for cb, name in getattr(self, "_wrapped", []):
            cb.__dict__.pop(name, None)
        self._wrapped = []
        if self._opt is not None and self._orig_step is not None:
            if self._own_attr is not None:  # a scheduler's counting wrapper, say
                self._opt.step = self._own_attr  # type: ignore[method-assign]
            else:
                del self._opt.step  # back to the class's method
        self._orig_step = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._restore()
        if self.guard is not None:
            self.guard.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()
        if self.guard is not None and not self.guard._closed:
            self.guard.close()

    # -- the step ---------------------------------------------------------------------------
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        if self._in_step:
            return  # LBFGS evaluating its closure again inside the step: not a new batch
        self._losses.append(loss.detach().reshape(()).float())

    def _window_loss(self) -> torch.Tensor | None:
        losses, self._losses = self._losses, []
        if not losses:
            return None
        return torch.stack(losses).sum()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.guard is None or self._in_step:
            return
        loss = self._window_loss()
        if self.observe:
            self.guard.observe(loss)
            return
        self._go = self.guard.decide_step(loss)

    def _guarded_step(self, closure: Any = None, **kwargs: Any) -> Any:
        """The raw optimizer's step as Lightning calls it (with its closure, or from the fp16
        scaler without one)."""
        out = None
        if closure is not None:
            out = closure()  # training_step, backward, on_before_optimizer_step, clipping
        go, self._go = self._go, None
        if go is None:  # the hook did not run (a custom loop): decide here, after any clipping
            go = self.guard.decide_step(self._window_loss()) if self.guard is not None else True
        if go:
            assert self.guard is not None
            with self.guard.applying():
                if closure is not None and self.guard.executor.needs_closure:
                    # LBFGS: its first evaluation is the one just measured; the others rerun
                    # Lightning's closure (training_step, backward and this callback's hooks,
                    # which sit them out: they are the step's line search, not new steps)
                    self._in_step = True
                    try:
                        self._orig_step(ReuseFirst(out, closure), **kwargs)
                    finally:
                        self._in_step = False
                else:
                    self._orig_step(**kwargs)
        return out

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise RuntimeError(f"trainguard: refusing to write a checkpoint while weights are "
                               f"non-finite ({', '.join(bad[:3])}); the Guard rolls back or halts "
                               "before such weights are trained on")
        if self.guard is not None:
            checkpoint["trainguard"] = self.guard.state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._pending_state = checkpoint.get("trainguard")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        state = getattr(self, "_pending_state", None)
        if state is not None and self.guard is not None:
            self.guard.load_state_dict(state)
            self._pending_state = None


__all__ = ["GuardCallback"]
