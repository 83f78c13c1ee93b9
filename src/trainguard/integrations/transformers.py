"""Hugging Face ``Trainer`` (transformers 5.x): ``GuardCallback`` and ``GuardTrainer``.

    from trainguard.integrations.transformers import GuardCallback, GuardTrainer
    trainer = GuardTrainer(model=model, args=args, train_dataset=ds)   # guard_options={...}
    trainer.train()
    print(trainer.guard.summary())

    # or, on a stock Trainer (statistics read after the Trainer's max_grad_norm clipping):
    cb = GuardCallback()
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()

What a callback cannot reach, and how this module reaches it:

- *The loss.* Callbacks receive neither the loss nor the gradient norm. The callback reads
  ``outputs.loss`` through a forward hook on the model (training forwards only; each
  micro-batch's loss as the model computed it, so gradient accumulation gives their mean), before
  ``logging_nan_inf_filter`` replaces a NaN loss in the logs: a NaN is a finding here. A model
  that accepts loss keywords (``**kwargs`` in ``forward``, as the library's language models do)
  is handed ``num_items_in_batch``, the whole step's count of target tokens, and returns each
  micro-batch's *summed* loss divided by it: those losses are then added up (times the number of
  processes when ``average_tokens_across_devices`` counted the tokens of all of them, as the
  Trainer does for its logs), so the Guard sees the step's mean token loss whatever
  ``gradient_accumulation_steps`` is, the figure the Trainer logs.
- *The update.* ``on_pre_optimizer_step`` cannot veto the step, so the callback wraps the step
  of the torch optimizer inside accelerate's ``AcceleratedOptimizer`` (the method accelerate
  calls, fp16 GradScaler path included). A skip leaves parameters, moments and step counters
  untouched and is reported to accelerate as a skipped step, so the Trainer does not advance its
  LR scheduler (``optimizer_step_was_skipped``); ``state.global_step`` still advances (the
  Trainer counts loop iterations).
- *Statistics before ``max_grad_norm`` clipping.* The Trainer clips right before
  ``on_pre_optimizer_step``, through a private method. ``GuardTrainer`` (a ``Trainer``
  subclass that adds the callback itself) measures and decides just before that clip; the
  callback alone on a stock Trainer measures after it, so its gradient norms are the clipped ones
  (NaN/Inf are caught either way; a gradient explosion shows as a loss spike instead).
  With ``max_grad_norm=0`` both measure the raw gradients.

Also: ``should_save`` waits while ``guard.healthy`` is False (a NaN run never rotates the last good
checkpoint away); each checkpoint the Trainer writes gets the Guard's state beside it
(``trainguard_state.json``, written atomically by the main process), and a run resumed from a
checkpoint (``trainer.train(resume_from_checkpoint=...)``) resumes the Guard from it: its LR
scale, clip statistics, counters and detector histories, so a learning rate the Guard cut is not
restored to full by the resume (without that file the Guard starts afresh and says so); findings and actions are added to
the Trainer's logs (``trainguard/...`` counters, in ``on_log``: integrations that run before the
callback see them at the next log); a halt raises :class:`trainguard.TrainingUnstable` with the
story out of ``trainer.train()``.

Not supported: DeepSpeed (it steps inside ``backward``; use ``GuardCallback(observe=True)``,
which measures, detects and reports but never acts), ``Guard(sync=False)``.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

try:
    import transformers
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover
    raise ImportError("trainguard.integrations.transformers needs transformers 5.x: "
                      "pip install 'trainguard[transformers]'") from e

from .._fsio import atomic_write
from ..guard import Guard, unwrap_optimizer
from ..locate._replay import replaying
from ..model_loss import loss_in_output
from ..sinks.jsonl import decode, encode
from . import check_adapter_options

_MAJOR = int(transformers.__version__.split(".")[0])
if _MAJOR != 5:  # pragma: no cover
    raise ImportError(f"trainguard.integrations.transformers supports transformers 5.x, found "
                      f"{transformers.__version__}")


def _loss_of(out: Any) -> torch.Tensor | None:
    loss = loss_in_output(out)
    return loss.detach().reshape(()).float() if loss is not None else None


#: the Guard's state in a Trainer checkpoint folder (``checkpoint-N/``)
STATE_FILE = "trainguard_state.json"


class GuardCallback(TrainerCallback):
    """The Guard for a Hugging Face ``Trainer``; ``callback.guard`` once training has begun.

    Args:
        observe: measure, detect and report only (``Guard.observe``), never act.
        **guard_options: :class:`trainguard.Guard` keywords; the GradScaler is accelerate's.
    """

    def __init__(self, observe: bool = False, **guard_options: Any) -> None:
        check_adapter_options(guard_options, "GuardCallback", "accelerate")
        self.observe = bool(observe)
        self.options = guard_options
        self.guard: Guard | None = None
        self._losses: list[torch.Tensor] = []
        #: the window's losses were divided by the step's whole token count (``num_items_in_batch``)
        self._summed = False
        #: what a loss divided by ``num_items_in_batch`` is multiplied by: the processes that
        #: count went over (``average_tokens_across_devices``), as ``Trainer.compute_loss`` does
        self._items_scale = 1
        self._go: bool | None = None
        self._hook: Any = None
        self._undo: list[Any] = []
        self._logged: dict[str, int] = {}
        #: the checkpoint folder a resumed run starts from, when the caller knows it
        #: (``GuardTrainer.train(resume_from_checkpoint=path)``)
        self.resume_from: str | None = None

    # -- set-up -----------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise ValueError("GuardCallback: the Trainer passed no model/optimizer to "
                             "on_train_begin (transformers 5.x expected)")
        inner = unwrap_optimizer(optimizer)
        options = dict(self.options)
        options.setdefault("console", state.is_world_process_zero)
        self.guard = Guard(model, inner, scaler=getattr(optimizer, "scaler", None), **options)
        if state.global_step > 0:
            self._resume(args, state)
        world = int(getattr(args, "world_size", 1) or 1)
        self._items_scale = world if getattr(args, "average_tokens_across_devices", False) else 1
        self._hook = model.register_forward_hook(self._capture, with_kwargs=True)
        if not self.observe:
            self._wrap(optimizer, inner)

    def _resume(self, args: Any, state: Any) -> None:
        """A run resumed from a checkpoint: load the Guard's state saved beside it (the folder
        given to ``GuardTrainer.train``, ``args.resume_from_checkpoint``, or the Trainer's own
        ``output_dir/checkpoint-<global_step>``)."""
        assert self.guard is not None
        folders = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                   os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        for folder in folders:
            if not isinstance(folder, (str, os.PathLike)):
                continue
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as fh:
                    self.guard.load_state_dict(decode(json.load(fh)))
                return
        self.guard.core.event("resumed_without_guard_state", step=state.global_step, message=(
            f"the Trainer resumed at step {state.global_step} but no {STATE_FILE} was found "
            "beside its checkpoint: the Guard starts afresh (its LR scale and histories too)"))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The Trainer wrote ``checkpoint-<global_step>``: the Guard's state goes beside it."""
        if self.guard is None or self.guard._closed or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):  # a hyper-parameter search's run folder: not ours to guess
            return
        text = json.dumps(encode(self.guard.state_dict()), allow_nan=False)
        atomic_write(os.path.join(folder, STATE_FILE), lambda fh: fh.write(text))

    def _capture(self, module: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        # not the locate replay's forward: its loss joined the next step's window (a NaN
        # batch's replayed NaN made the next, healthy step a second non-finite finding)
        if module.training and torch.is_grad_enabled() and not replaying():
            loss = _loss_of(out)
            if loss is not None:
                self._losses.append(loss)
                if kwargs.get("num_items_in_batch") is not None:
                    self._summed = True

    def _window_loss(self) -> torch.Tensor | None:
        """The step's loss from its micro-batches' losses: their mean, or, when the model
        divided each by the step's whole token count (``num_items_in_batch``), their sum (scaled
        back to this process's share when the count spanned all processes)."""
        losses, self._losses = self._losses, []
        summed, self._summed = self._summed, False
        if not losses:
            return None
        if summed:
            return torch.stack(losses).sum() * self._items_scale
        return torch.stack(losses).mean()

    def _wrap(self, accelerated: Any, inner: torch.optim.Optimizer) -> None:
        orig = getattr(accelerated, "_optimizer_original_step_method", None) or inner.step
        marks = hasattr(accelerated, "_is_overflow")

        def guarded(*a: Any, **k: Any) -> Any:
            go, self._go = self._go, None
            if go is None:
                go = self.guard.decide_step(self._window_loss()) if self.guard else True
            if marks and getattr(accelerated, "scaler", None) is None:
                accelerated._is_overflow = not go  # the Trainer then holds its scheduler
            if not go:
                return None
            if hasattr(accelerated, "_accelerate_step_called"):
                accelerated._accelerate_step_called = True  # the scaler path: "stepped"
            assert self.guard is not None
            with self.guard.applying():
                return orig(*a, **k)

        if getattr(accelerated, "scaler", None) is not None and hasattr(
                accelerated, "_optimizer_patched_step_method"):
            old = accelerated._optimizer_patched_step_method
            accelerated._optimizer_patched_step_method = guarded
            self._undo.append(lambda: setattr(accelerated, "_optimizer_patched_step_method", old))
        else:
            had = inner.__dict__.get("step")
            inner.step = guarded  # type: ignore[method-assign]
            self._undo.append(lambda: setattr(inner, "step", had) if had is not None
                              else inner.__dict__.pop("step", None))

    def _teardown(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.guard is not None and not self.guard._closed:
            self.guard.close()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._teardown()

    # -- per step ---------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.observe and self.guard is not None:
            self.guard.observe(self._window_loss())

    def _defer_unhealthy_save(self, control: Any, model: Any) -> None:
        """The Trainer saves (and rotates ``save_total_limit`` old checkpoints away) only while
        ``guard.healthy``: a NaN run never replaces the last good checkpoint."""
        if not control.should_save:
            return
        if self.guard is not None and not self.guard._closed:
            if not self.guard.healthy:
                control.should_save = False
                self.guard.core.event("checkpoint_deferred", message="state unhealthy: Trainer "
                                      f"save deferred (last good step {self.guard.last_good_step})")
        elif model is not None and not all(torch.isfinite(p).all() for p in model.parameters()):
            control.should_save = False  # never write non-finite weights

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        self._defer_unhealthy_save(control, model)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        self._defer_unhealthy_save(control, model)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if logs is None or self.guard is None:
            return
        for kind, n in self.guard.finding_counts.items():
            logs[f"trainguard/finding/{kind}"] = n
        for kind, n in self.guard.action_counts.items():
            logs[f"trainguard/action/{kind}"] = n


class GuardTrainer(Trainer):
    """A ``Trainer`` with the Guard attached, measuring before ``max_grad_norm`` clipping.

    ``GuardTrainer(..., guard_options={...})``; ``trainer.guard`` is the Guard once training
    has begun. Needed only for pre-clip statistics: the Trainer clips in a private method that
    no callback can precede (see the module docstring)."""

    def __init__(self, *args: Any, guard_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard_callback = GuardCallback(**(guard_options or {}))
        self.add_callback(self.guard_callback)

    @property
    def guard(self) -> Guard | None:
        return self.guard_callback.guard

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self.guard_callback.resume_from = os.fspath(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _clip_grad_norm(self, model: Any) -> Any:
        cb = self.guard_callback
        if cb.guard is not None and not cb.observe:
            cb._go = cb.guard.decide_step(cb._window_loss())  # before the Trainer's clip
        return super()._clip_grad_norm(model)


__all__ = ["GuardCallback", "GuardTrainer"]
