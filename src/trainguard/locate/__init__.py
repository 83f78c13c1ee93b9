"""Locate the first NaN/Inf: which module, in which pass, and why.

Two tiers (research/prior-art-tools.md §9.1): the Guard's fused norms notice a non-finite
loss, gradient or weight at no cost; then the failing step is *replayed* once under heavy
instrumentation to name its origin:

``input``       the batch holds NaN/Inf
``forward``     the first module whose output became non-finite while its inputs were finite
``loss``        the forward is finite, the gradient flowing into the model's output is not
``backward``    the first module (in backward order) whose input or parameter gradient became
                non-finite while the gradient flowing into it was finite
``optimizer``   weights went non-finite in an update whose gradients were finite
``parameters``  weights were already non-finite before the step

Entry points:

* ``StepCapture(model)``: used by the Guard (``Guard(..., locate=True)``, the default);
* ``locate(model, loss_fn, batch)``: on demand, returns a :class:`Location`;
* ``trainguard replay BUNDLE``: re-runs a reproducer bundle written by ``StepCapture(model,
  bundle_dir=...)`` and prints the same location.

See docs/locate.md for the rules, the measured accuracy and the overhead.
"""
from __future__ import annotations

import argparse
import types as _types
import importlib
import os
import sys
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ._bundle import Bundle, BundleError, write_bundle
from ._capture import StepCapture, dist_rank, has_randomness
from ._replay import (LOSS_WHERE, Location, autocast_state, clean_name, nonfinite_leaves,
                      nonfinite_params, parameters_location, replay_step, tensor_leaves, unwrap)

__all__ = ["StepCapture", "Location", "locate", "replay_bundle", "Bundle", "BundleError",
           "add_arguments", "run"]


def locate(model: nn.Module, loss_fn: Callable[..., torch.Tensor] | None, batch: Any, *,
           step: int = 0, backward: bool = True) -> Location:
    """Run one step of ``model`` on ``batch`` under instrumentation and name where the first
    NaN/Inf comes from. Nothing is modified: parameters, ``.grad``, buffers (BatchNorm
    running statistics) and the RNG state are as before; no optimizer is involved.

    ``batch`` is passed the way most loops do it:

    * a tuple/list ``(inputs, *targets)``: ``loss_fn(model(inputs), *targets)``;
    * a dict: ``loss_fn(model(**batch), batch)``;
    * a tensor: ``loss_fn(model(batch))``.

    ``loss_fn=None`` means the model returns the loss itself (a scalar tensor, or an output
    with a ``loss`` attribute/key, as Hugging Face models do). The ambient autocast settings
    apply, so wrap the call in ``torch.autocast(...)`` to locate a mixed-precision failure.

    Returns a :class:`Location` (``.origin``, ``.where``, ``.message``, ``.finding``);
    ``.found`` is False when the step is finite throughout.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"locate expects a torch.nn.Module as model, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    if isinstance(batch, torch.Tensor):
        args, kwargs, targets = (batch,), {}, ()
        path0 = "batch"
    elif isinstance(batch, Mapping):
        args, kwargs, targets = (), dict(batch), (batch,)
        path0 = "batch"
    elif isinstance(batch, (tuple, list)) and len(batch) >= 1:
        args, kwargs, targets = (batch[0],), {}, tuple(batch[1:])
        path0 = "batch"
    else:
        raise TypeError("batch must be a tensor, a dict of model keyword arguments, or a "
                        f"tuple/list (inputs, *targets); got {type(batch).__name__}")
    if not tensor_leaves(batch):
        raise ValueError("batch holds no tensor")
    inner = unwrap(model)
    bad = nonfinite_params(inner)
    if bad:
        loc = parameters_location(bad, optimizer=False)
    else:
        bad_in = nonfinite_leaves(batch, path0, allow_masks=True)
        if bad_in:
            path, s = bad_in[0]
            what = "a target" if isinstance(batch, (tuple, list)) and not path.startswith("batch[0]") else "an input"
            loc = Location("input", path, f"the batch holds NaN/Inf in {what}: {path} "
                           f"({s.describe()})", tuple(p for p, _ in bad_in),
                           {"culprit": s.to_dict()})
        else:
            def closure(out: Any) -> torch.Tensor:
                if loss_fn is None:
                    return _model_loss(out)
                if isinstance(batch, Mapping):
                    return loss_fn(out, batch)
                return loss_fn(out, *targets)
            try:
                loc = replay_step(inner, args, kwargs, loss_fn=closure,
                                  autocast=autocast_state(), backward=backward)
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                shapes = [tuple(t.shape) for _, t in tensor_leaves((args, kwargs))][:4]
                raise ValueError(
                    f"tg.locate could not run the model and loss on this batch: "
                    f"{type(e).__name__}: {str(e).splitlines()[0]}. The batch's tensors have "
                    f"shapes {shapes}; pass the batch exactly as the training loop feeds it "
                    "((inputs, *targets), a dict of keyword arguments, or a tensor) and the "
                    "loss_fn(output, *targets) it uses") from e
            loc = _from_replay(loc)
    loc.evidence["rank"] = dist_rank()
    loc.finding = loc.as_finding(step=step)
    return loc


def _from_replay(loc: Location) -> Location:
    if loc.origin == "input":  # caught inside the model call: name it as the batch
        loc.where = "batch" if loc.where == "args[0]" else loc.where.replace("kwargs.", "batch.")
        loc.locations = (loc.where,)
    return loc


def _model_loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if isinstance(getattr(out, "loss", None), torch.Tensor):
        return out.loss
    raise TypeError("loss_fn=None needs a model that returns the loss (a scalar tensor or an "
                    f"output with a 'loss'), got {type(out).__name__}")


# ---------------------------------------------------------------------------- bundles
def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path or os.getcwd()), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def load_factory(spec: str, forbid: str | None = None) -> Callable[[], Any]:
    """Import ``module:callable``. The working directory is searched too, unless it lies in
    ``forbid`` (a bundle's folder), and no path inside ``forbid`` is searched."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"expected a 'module:callable' factory, got {spec!r}")
    modname, attr = spec.split(":", 1)
    saved = list(sys.path)
    if forbid is not None:
        sys.path[:] = [p for p in sys.path if not _inside(p, forbid)]
    if (os.getcwd() not in sys.path and "" not in sys.path
            and (forbid is None or not _inside(os.getcwd(), forbid))):
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(modname)
    finally:
        if forbid is not None:
            sys.path[:] = saved
    if forbid is not None and _inside(getattr(obj, "__file__", "") or os.sep, forbid):
        raise BundleError(f"{modname} resolves to a file inside the bundle: refusing to run it")
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def _model_from(res: Any) -> nn.Module:
    if isinstance(res, nn.Module):
        return res
    if isinstance(res, Mapping) and isinstance(res.get("model"), nn.Module):
        return res["model"]
    if isinstance(res, (tuple, list)) and res and isinstance(res[0], nn.Module):
        return res[0]
    raise ValueError("the factory must return an nn.Module (or a dict with 'model', or a tuple "
                     f"whose first item is the model); got {type(res).__name__}")


def replay_bundle(bundle: str | Bundle, model: nn.Module | None = None, *,
                  factory: str | None = None, device: str | None = None,
                  trust: bool = False) -> Location:
    """Rebuild the model (``model`` given, else ``factory``, else - only with ``trust=True`` -
    the manifest's ``model_factory``), load the bundle's weights, re-run the step and locate
    again.

    Trust model: a bundle's tensors are data (safetensors or ``torch.load(weights_only=True)``,
    never unpickled), but the factory a manifest names is code. It is imported only when you
    say so (``trust=True``, ``trainguard replay --trust-bundle``) or name it yourself
    (``factory=``, ``--factory``), and never from the bundle's own folder: a Python file
    shipped inside a bundle is not importable through the replay."""
    b = bundle if isinstance(bundle, Bundle) else Bundle(os.fspath(bundle))
    m = b.manifest
    if model is None:
        spec = factory
        if spec is None and m.get("model_factory"):
            if not trust:
                raise BundleError(
                    f"the bundle names the model factory {m['model_factory']!r}; importing it "
                    "runs code: pass --factory " + str(m["model_factory"]) + " (or "
                    "--trust-bundle) if you trust where this bundle came from")
            spec = m["model_factory"]
        if not spec:
            raise BundleError("the bundle names no model factory: pass --factory module:callable")
        model = _model_from(load_factory(spec, forbid=b.path)())
    dev = torch.device(device) if device else torch.device(
        "cuda" if m.get("device") == "cuda" and torch.cuda.is_available() else "cpu")
    model = unwrap(model).to(dev)
    sd = b.model_state()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise BundleError(f"the factory's model does not match the bundle's weights: {e}") from e
    model.train(bool(m.get("training", True)))
    if m.get("origin") in ("parameters", "optimizer"):
        bad = nonfinite_params(model)
        if bad:
            return parameters_location(bad, optimizer=m.get("origin") == "optimizer")
    args, kwargs = b.inputs()
    mv = lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
    from ._replay import _map_plain
    args, kwargs = _map_plain(args, mv), _map_plain(kwargs, mv)
    grads = [g.to(dev) if g is not None else None for g in b.grad_outputs()]
    rng, cuda_rng = b.rng()
    if dev.type != "cuda":
        cuda_rng = None
    return replay_step(model, args, kwargs, grad_outputs=grads if any(g is not None for g in grads) else None,
                       rng=rng, cuda_rng=cuda_rng, autocast=m.get("autocast"),
                       device_type=dev.type, grad_enabled=bool(m.get("grad_enabled", True)))


# ---------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="a reproducer bundle directory written by the Guard")
    parser.add_argument("--factory", metavar="module:callable", default=None,
                        help="callable that builds the model (default: the bundle's model_factory)")
    parser.add_argument("--device", default=None, help="device to replay on (default: the "
                        "recorded one when available, else cpu)")
    parser.add_argument("--trust-bundle", action="store_true",
                        help="import the model factory the bundle's manifest names (code from "
                             "wherever the bundle came from; without this flag only --factory "
                             "is imported)")


def run(args: argparse.Namespace) -> int:
    """0: located (and printed); 1: the replay stayed finite; 2: bad bundle or factory."""
    if args.device is not None:
        import torch
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            print(f"trainguard replay: --device {args.device!r} is not a torch device (expected "
                  f"e.g. cpu, cuda, cuda:0): {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        if dev.type == "cuda" and not torch.cuda.is_available():
            print(f"trainguard replay: --device {args.device!r}: CUDA is not available on "
                  "this machine (use --device cpu)", file=sys.stderr)
            return 2
    try:
        b = Bundle(args.bundle)
        loc = replay_bundle(b, factory=args.factory, device=args.device,
                            trust=bool(getattr(args, "trust_bundle", False)))
    except (BundleError, ValueError, TypeError, ImportError, AttributeError) as e:
        print(f"trainguard replay: {e}", file=sys.stderr)
        return 2
    m = b.manifest
    print(f"trainguard replay: step {m.get('step')}"
          + (f" (rank {m.get('rank')})" if m.get("rank") else ""))
    if not loc.found:
        print(f"  not reproduced: {loc.message}")
        print(f"  recorded: origin={m.get('origin')} where={m.get('where')}")
        return 1
    print(f"  origin={loc.origin} where={loc.where}")
    print(f"  {loc.message}")
    same = loc.origin == m.get("origin") and loc.where == m.get("where")
    print("  matches the recorded location" if same else
          f"  recorded: origin={m.get('origin')} where={m.get('where')} (differs)")
    return 0


# ``trainguard.locate`` is both this package and the on-demand function: once the package is
# imported (the Guard imports StepCapture from it), ``tg.locate`` resolves to the module, so
# the module itself is made callable and forwards to :func:`locate`.
class _CallableModule(_types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Location:
        return locate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
