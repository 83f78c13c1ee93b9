"""Shared plumbing for the doctor: input validation, copies that never touch the user's
objects, RNG save/restore, and the tiny training step every measurement reuses."""
from __future__ import annotations

import copy
import itertools
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..clone import deepcopy_model

Batch = tuple[Any, Any]
LossFn = Callable[[Any, Any], torch.Tensor]


class DoctorInputError(ValueError):
    """Raised when doctor()/repair() get something they cannot work with."""


def validate_inputs(model: Any, loss_fn: Any, data: Any, optimizer: Any,
                    max_batches: int) -> list[Batch]:
    """Check the arguments early and materialise up to ``max_batches`` batches.

    ``data`` must be an iterable of ``(x, y)`` pairs (a list, a DataLoader, a generator).
    Only the first ``max_batches`` are read; a generator is consumed that far.
    """
    if not isinstance(model, nn.Module):
        raise DoctorInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise DoctorInputError(f"loss_fn must be callable as loss_fn(output, y), got "
                               f"{type(loss_fn).__name__}")
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
    batches: list[Batch] = []
    for i, b in enumerate(itertools.islice(it, max_batches)):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise DoctorInputError(f"batch {i} of data is not an (x, y) pair "
                                   f"(got {type(b).__name__}"
                                   f"{' of length %d' % len(b) if isinstance(b, (tuple, list)) else ''})")
        batches.append((b[0], b[1]))
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
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def batch_size(x: Any) -> int:
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


def loss_of(model: nn.Module, loss_fn: LossFn, batch: Batch, device: torch.device,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    x, y = batch
    x = to_device(x, device, dtype)
    y = to_device(y, device, dtype if (isinstance(y, torch.Tensor) and y.is_floating_point()) else None)
    out = model(x)
    loss = loss_fn(out, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise DoctorInputError("loss_fn(output, y) must return a scalar tensor, got "
                               f"{type(loss).__name__}"
                               f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}")
    return loss.reshape(())


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
