"""Shared plumbing for the doctor: input validation, copies that never touch the user's
objects, RNG save/restore, and the tiny training step every measurement reuses."""
from __future__ import annotations

import copy
import itertools
import random
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..clone import deepcopy_model
from ..model_loss import loss_in_output

Batch = tuple[Any, Any]
#: ``loss_fn(output, y)``, or None for a model that returns its own loss (see :func:`model_loss`)
LossFn = Callable[[Any, Any], torch.Tensor] | None


class DoctorInputError(ValueError):
    """Raised when doctor()/repair() get something they cannot work with."""


class Kwargs(dict):  # type: ignore[type-arg]
    """A batch given as a mapping (a Hugging Face batch: ``input_ids``, ``attention_mask``,
    ``labels``), held as ``(Kwargs(batch), None)``: the model is called as ``model(**batch)``
    and returns its own loss (``loss_fn=None``)."""


class Whole:
    """A batch for a LightningModule's ``training_step`` (``loss_fn=None``): held as
    ``(Whole(batch), None)`` and handed over as the DataLoader yielded it. Never concatenated
    into a larger probe batch: a module that keeps state between steps (Lightning's LSTM demo
    carries its hidden state, sized by the batch, from one ``training_step`` to the next)
    failed with "Expected hidden[0] size (4, 20, 512), got [4, 256, 512]"."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch


def has_training_step(model: Any) -> bool:
    """A LightningModule (or any module with a ``training_step``): with ``loss_fn=None`` the
    doctor calls ``model.training_step(batch, 0)`` and reads the loss it returns."""
    return callable(getattr(model, "training_step", None))


def configured_optimizer(model: Any) -> torch.optim.Optimizer | None:
    """The optimizer a LightningModule's ``configure_optimizers()`` builds (an optimizer, a
    dict with ``"optimizer"``, a list or tuple holding them; the first one), or None when it
    builds none or needs a Trainer to build it."""
    conf = getattr(model, "configure_optimizers", None)
    if not callable(conf):
        return None
    try:
        res = conf()
    except Exception:  # noqa: BLE001 - it may read self.trainer (estimated_stepping_batches)
        return None
    for _ in range(3):
        if isinstance(res, torch.optim.Optimizer):
            return res
        if isinstance(res, Mapping):
            res = res.get("optimizer")
        elif isinstance(res, (list, tuple)) and res:
            res = res[0]
        else:
            return None
    return res if isinstance(res, torch.optim.Optimizer) else None


def check_loss_fn(loss_fn: Any) -> None:
    if loss_fn is not None and not callable(loss_fn):
        raise DoctorInputError(f"loss_fn must be callable as loss_fn(output, y), or None when "
                               f"the model returns its own loss; got {type(loss_fn).__name__}")


def as_batch(b: Any, i: int, loss_fn: LossFn, whole: bool = False) -> Batch:
    """One batch of the user's ``data`` as the doctor holds it: an ``(x, y)`` pair, or, when
    the model computes its own loss (``loss_fn=None``), a mapping of keyword arguments; with
    ``whole`` (a LightningModule's ``training_step`` takes the batch) any batch, whole."""
    if isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], Whole):
        return b  # held already (repair hands its batches to the doctor)
    if whole:
        return Whole(b), None
    if isinstance(b, Mapping):
        if loss_fn is None:
            return Kwargs(b), None
        raise DoctorInputError(f"batch {i} of data is a mapping (keys {', '.join(map(str, list(b)[:5]))}): "
                               "pass loss_fn=None when the model computes its own loss from "
                               "model(**batch), or yield (x, y) pairs")
    if not isinstance(b, (tuple, list)) or len(b) != 2:
        raise DoctorInputError(f"batch {i} of data is not an (x, y) pair "
                               f"(got {type(b).__name__}"
                               f"{' of length %d' % len(b) if isinstance(b, (tuple, list)) else ''})"
                               + ("; with loss_fn=None a batch may also be a mapping, passed as "
                                  "model(**batch)" if loss_fn is None else ""))
    return b[0], b[1]


def validate_inputs(model: Any, loss_fn: Any, data: Any, optimizer: Any,
                    max_batches: int) -> list[Batch]:
    """Check the arguments early and materialise up to ``max_batches`` batches.

    ``data`` must be an iterable of ``(x, y)`` pairs (a list, a DataLoader, a generator), or
    of mappings when ``loss_fn`` is None (see :func:`as_batch`). Only the first
    ``max_batches`` are read; a generator is consumed that far.
    """
    if not isinstance(model, nn.Module):
        raise DoctorInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_loss_fn(loss_fn)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise DoctorInputError(f"optimizer must be a torch.optim.Optimizer or None, got "
                               f"{type(optimizer).__name__}")
    if isinstance(data, torch.Tensor) or isinstance(data, (str, bytes)):
        raise DoctorInputError("data must be an iterable of (x, y) batches, got a "
                               f"{type(data).__name__}; wrap one batch as [(x, y)]")
    try:
        it = iter(data)
    except TypeError:
        raise DoctorInputError(f"data must be an iterable of (x, y) batches, got "
                               f"{type(data).__name__}") from None
    whole = loss_fn is None and has_training_step(model)
    batches = [as_batch(b, i, loss_fn, whole) for i, b in enumerate(itertools.islice(it, max_batches))]
    if not batches:
        raise DoctorInputError("data yielded no batch: the doctor needs at least one (x, y) batch")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DoctorInputError("the model has no trainable parameter")
    if optimizer is not None:
        mine = {id(p) for p in model.parameters()}
        theirs = [p for g in optimizer.param_groups for p in g["params"]]
        if not any(id(p) in mine for p in theirs):
            raise DoctorInputError("the optimizer holds none of the model's parameters: build it "
                                   "on model.parameters()")
    return batches


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        moved = {k: to_device(v, device, dtype) for k, v in obj.items()}
        return Kwargs(moved) if isinstance(obj, Kwargs) else moved
    if isinstance(obj, Whole):
        return Whole(to_device(obj.batch, device, dtype))
    return obj


def batch_size(x: Any) -> int:
    if isinstance(x, Whole):
        return batch_size(x.batch)
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (list, tuple)) and x:
        return batch_size(x[0])
    if isinstance(x, dict) and x:
        return batch_size(next(iter(x.values())))
    return 1


def probe_batch(batches: Sequence[Batch], target: int = 256) -> Batch:
    """A fixed probe batch of about ``target`` samples: concatenated user batches when they
    are plain tensors, else the first batch. (Mechanisms §3.3: curvature and per-layer
    statistics are measured on a fixed probe batch, not a moving mini-batch.)"""
    x0, y0 = batches[0]
    if not (isinstance(x0, torch.Tensor) and isinstance(y0, torch.Tensor)):
        return batches[0]
    xs, ys, n = [], [], 0
    for x, y in batches:
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or \
                x.shape[1:] != x0.shape[1:] or y.shape[1:] != y0.shape[1:]:
            break
        xs.append(x)
        ys.append(y)
        n += batch_size(x)
        if n >= target:
            break
    return torch.cat(xs)[:max(target, batch_size(x0))], torch.cat(ys)[:max(target, batch_size(x0))]


def cycle(batches: Sequence[Batch]) -> Iterator[Batch]:
    while True:
        yield from batches


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy with no gradients, in the same mode; in-place activations made
    out-of-place so forward hooks see distinct input and output tensors."""
    m = deepcopy_model(model)
    for p in m.parameters():
        p.grad = None
    for mod in m.modules():
        if getattr(mod, "inplace", False) is True:
            setattr(mod, "inplace", False)
    return m


def freeze_dropout(model: nn.Module) -> None:
    """Put dropout layers in eval mode so repeated forwards are deterministic (HVPs,
    shadow runs); BatchNorm keeps its mode so batch statistics are what training sees."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            mod.eval()


def clone_optimizer(opt: torch.optim.Optimizer | None, src: nn.Module, dst: nn.Module, *,
                    fresh: bool = False, default_lr: float = 1e-2) -> torch.optim.Optimizer:
    """The same optimizer type and hyper-parameters over ``dst``'s parameters; with its
    state copied unless ``fresh``. Without an optimizer: plain SGD at ``default_lr``."""
    if opt is None:
        return torch.optim.SGD(dst.parameters(), lr=default_lr)
    mapping = {id(p): q for p, q in zip(src.parameters(), dst.parameters())}
    groups = []
    for g in opt.param_groups:
        ng = {k: v for k, v in g.items() if k != "params"}
        ps = [mapping[id(p)] for p in g["params"] if id(p) in mapping]
        if ps:
            ng["params"] = ps
            groups.append(ng)
    new: torch.optim.Optimizer = type(opt)(groups)  # type: ignore[call-arg]
    if not fresh:
        sd = opt.state_dict()
        # keep only groups/params that were mapped (all of them in the normal case)
        if len(groups) == len(opt.param_groups) and \
                all(len(a["params"]) == len(b["params"]) for a, b in zip(groups, opt.param_groups)):
            new.load_state_dict(copy.deepcopy(sd))  # step tensors would be shared otherwise
    return new


def lr_of(opt: torch.optim.Optimizer | None, default_lr: float = 1e-2) -> float:
    if opt is None:
        return default_lr
    lr = opt.param_groups[0].get("lr", default_lr)
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def set_lr(opt: torch.optim.Optimizer, lrs: Sequence[float]) -> None:
    for g, lr in zip(opt.param_groups, lrs):
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python, numpy and torch (CPU and CUDA) RNG states on exit."""
    py, npst, tst = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(tst)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def forward(model: nn.Module, batch: Batch, device: torch.device, dtype: torch.dtype | None = None,
            *, with_targets: bool = False) -> tuple[Any, Any]:
    """The model's output on ``batch`` (moved to ``device``; floating inputs cast to
    ``dtype``) and the targets: ``model(x)``, ``model(x, y)`` with ``with_targets`` (a model
    that computes its own loss, as nanoGPT's and makemore's ``forward(idx, targets)``),
    ``model(**batch)`` for a mapping batch, or a LightningModule's ``training_step(batch, 0)``
    for a batch held whole (:class:`Whole`)."""
    x, y = batch
    x = to_device(x, device, dtype)
    if isinstance(x, Whole):
        return _training_step(model, x.batch), None
    if not isinstance(x, Kwargs):
        y = to_device(y, device, dtype if (isinstance(y, torch.Tensor) and y.is_floating_point()) else None)
    if not (isinstance(x, Kwargs) or (with_targets and y is not None)):
        return model(x), y
    try:
        return (model(**x) if isinstance(x, Kwargs) else model(x, y)), y
    except TypeError as e:
        how = "model(**batch)" if isinstance(x, Kwargs) else "model(x, y)"
        raise DoctorInputError(f"with loss_fn=None the model is called as {how} and returns its "
                               f"own loss; {type(model).__name__} failed: {e}") from e


def _training_step(model: Any, batch: Any) -> Any:
    """``model.training_step(batch, 0)`` outside a Trainer: its ``self.log`` calls only warn
    that no Trainer is attached, said once here instead of at every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        out = model.training_step(batch, 0)
    if out is None:
        raise DoctorInputError(f"{type(model).__name__}.training_step returned None (manual "
                               "optimization?): the doctor needs the loss it returns")
    return out


def model_loss(out: Any) -> torch.Tensor:
    """The loss a model returned (see :func:`trainguard.model_loss.loss_in_output`): the
    output itself when it is a scalar tensor, its ``loss`` (a Hugging Face ``ModelOutput``, a
    dict), or the scalar tensor of a tuple (nanoGPT's and makemore's ``(logits, loss)``)."""
    loss = loss_in_output(out)
    if loss is None:
        raise DoctorInputError(
            "with loss_fn=None the model must return its loss: a scalar tensor, an output with a "
            "'loss' (Hugging Face: put the labels in the batch), or a tuple holding it (nanoGPT's "
            f"(logits, loss)); got {type(out).__name__}"
            + (" with loss None" if isinstance(out, Mapping) and "loss" in out else "")
            + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""))
    return loss


def output_and_loss(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device,
                    dtype: torch.dtype | None = None) -> tuple[Any, torch.Tensor]:
    """The model's output on ``batch`` and the loss as a 0-d tensor: ``loss_fn(output, y)``,
    or with ``loss_fn=None`` the loss the model returns (see :func:`model_loss`)."""
    out, y = forward(model, batch, device, dtype, with_targets=loss_fn is None)
    loss = model_loss(out) if loss_fn is None else loss_fn(out, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DoctorInputError(f"loss_fn(output, y) must return a scalar tensor, got {type(loss).__name__}"
                               f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}")
    return out, loss.reshape(())


def loss_of(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    return output_and_loss(model, loss_fn, batch, device, dtype)[1]


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn,
                batches: Iterable[Batch], steps: int, device: torch.device) -> list[float]:
    """Plain steps; returns the losses (stops at the first non-finite loss)."""
    losses: list[float] = []
    it = cycle(list(batches)) if isinstance(batches, (list, tuple)) else iter(batches)
    for _ in range(steps):
        b = next(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, loss_fn, b, device)
        v = float(loss.detach())
        losses.append(v)
        if not np.isfinite(v):
            break
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return losses


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    try:
        if not np.isfinite(x):
            return str(x)
    except TypeError:
        return str(x)
    return f"{x:.{digits}g}"
