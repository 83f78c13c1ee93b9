"""The loss a model returns, read when the training loop shows the Guard none.

Many models compute their own loss: nanoGPT's, minGPT's and makemore's ``forward(idx,
targets)`` return ``(logits, loss)``, a Hugging Face model given ``labels`` returns an output
with ``.loss``. A loop that hands the optimizer to a trainer it does not write (minGPT's
``Trainer`` calls ``optimizer.step()`` itself: a :class:`~trainguard.GuardedOptimizer` there
gets no closure and no loss) left the Guard without the loss, and its loss-based detectors
(spike, divergence, plateau, the chance level) sat every step out.

:class:`ModelLoss` puts one forward hook on the model's root while the Guard has not been shown
a loss: the losses the model returns in training forwards with gradients (not evaluation
passes, not a locate replay) are the step's, their mean when there are several (gradient
accumulation), as :meth:`Guard.observe_loss` would take them, or their sum when the forwards
were handed ``num_items_in_batch`` (a Hugging Face model divides each micro-batch's summed loss by
the whole step's token count: their mean was 1/N of the step's loss over N micro-batches); a
scalar without a graph (an accuracy returned beside the logits) is not taken for the loss. What the first one's graph
says it is (a cross-entropy: the chance level) is read in the forward; no graph is kept until
the step. The hook is removed at the
first step whose loss the loop shows (``guard.step(loss)``, a closure, ``observe_loss``), and
for good when the model's training forwards return no loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from .hooks import register_private
from .locate._replay import replaying


def loss_in_output(out: Any) -> torch.Tensor | None:
    """The loss in a model's output: the output itself when it is a one-element floating
    tensor, its ``loss`` (a Hugging Face ``ModelOutput``, a dict), or the first one-element
    floating tensor of a tuple or list (nanoGPT's ``(logits, loss)``, a Hugging Face tuple
    ``(loss, logits, ...)``; a 0-d one before others). None when there is none."""
    if isinstance(out, torch.Tensor):
        return out if out.numel() == 1 and out.is_floating_point() else None
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss if loss.numel() == 1 else None
    if isinstance(out, (tuple, list)):
        scalars = [t for t in out if isinstance(t, torch.Tensor) and t.numel() == 1
                   and t.is_floating_point()]
        if scalars:
            return min(scalars, key=lambda t: t.dim())
    return None


class ModelLoss:
    """The losses ``model`` returned in this step's training forwards (see the module)."""

    def __init__(self, model: nn.Module,
                 kind_of: Callable[[torch.Tensor], str | None] | None = None) -> None:
        self.model = model
        self._handle: Any = None
        self._losses: list[torch.Tensor] = []
        #: what the step's first loss's graph says it is, read in the forward by ``kind_of``
        #: (the chance level's evidence): no graph is held until the step, which a forward
        #: with no backward after it would have kept alive with its activations
        self.kind_of = kind_of
        self._kind: str | None = None
        self._forwards = 0   # training forwards with gradients seen this step
        #: this step's losses were divided by the step's whole item count (``num_items_in_batch``
        #: handed to the forward): the step's loss is their sum
        self.summed = False
        self.gave_up = False  # the model's training forwards return no loss

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self) -> None:
        if self._handle is None and not self.gave_up:
            model = self.model
            self._handle = register_private(model, "_forward_hooks",
                                            lambda: model.register_forward_hook(self._on_forward,
                                                                                with_kwargs=True))

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._losses, self._kind, self._forwards, self.summed = [], None, 0, False

    def _on_forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        if not (module.training and torch.is_grad_enabled()) or replaying():
            return
        self._forwards += 1
        loss = loss_in_output(out)
        if loss is None or not loss.requires_grad:  # a metric beside the logits is no loss
            return
        if not self._losses and self.kind_of is not None:
            self._kind = self.kind_of(loss)
        self._losses.append(loss.detach().reshape(()))
        if kwargs.get("num_items_in_batch") is not None:
            self.summed = True

    def take(self) -> tuple[list[torch.Tensor], str | None, bool]:
        """This step's losses (detached), what the first one's graph said it is, and whether
        they add up to the step's loss (``summed``) rather than average to it; empties the step.
        A step whose training forwards returned no loss removes the hook for good."""
        losses, kind, summed = self._losses, self._kind, self.summed
        if self._forwards and not losses:
            self.gave_up = True
            self.remove()
        self._losses, self._kind, self._forwards, self.summed = [], None, 0, False
        return losses, kind, summed
