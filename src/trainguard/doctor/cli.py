"""``trainguard doctor module:factory [--html PATH] [--json PATH]``

The factory is a callable ``name`` in an importable ``module`` (the current directory is on
sys.path) taking no arguments and returning either

* a dict ``{"model": ..., "loss_fn": ..., "data": ..., "optimizer": ...}`` (``optimizer``
  optional; extra key ``"doctor_kwargs"`` is passed on to :func:`trainguard.doctor`), or
* a tuple ``(model, loss_fn, data)`` or ``(model, loss_fn, data, optimizer)``.

``loss_fn`` may be None for a model that returns its own loss, or a LightningModule (its
``training_step``; see :func:`trainguard.doctor`).

Exit status: 0 when diagnosed (1 with ``--fail-on-findings`` when the model is not
healthy), 2 for a factory that cannot be loaded or returns the wrong thing.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("factory", metavar="module:factory",
                        help="callable returning {model, loss_fn, data[, optimizer]} or a tuple")
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    parser.add_argument("--steps", type=int, default=20, help="trial optimizer steps on a copy (default 20)")
    parser.add_argument("--no-precision", action="store_true", help="skip the precision audit")
    parser.add_argument("--no-lr-range", action="store_true", help="skip the LR range test")
    parser.add_argument("--fail-on-findings", action="store_true",
                        help="exit 1 when a warning or error is found")


def load_factory(spec: str) -> Any:
    if ":" not in spec:
        raise ValueError(f"expected module:factory, got {spec!r}")
    modname, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    mod = importlib.import_module(modname)
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def unpack(res: Any) -> tuple[Any, Any, Any, Any, dict]:
    if isinstance(res, dict):
        missing = [k for k in ("model", "loss_fn", "data") if k not in res]
        if missing:
            raise ValueError(f"the factory's dict lacks {', '.join(missing)}")
        return res["model"], res["loss_fn"], res["data"], res.get("optimizer"), dict(res.get("doctor_kwargs") or {})
    if isinstance(res, (tuple, list)) and len(res) in (3, 4):
        return res[0], res[1], res[2], (res[3] if len(res) == 4 else None), {}
    raise ValueError("the factory must return a dict {model, loss_fn, data[, optimizer]} or a "
                     f"tuple (model, loss_fn, data[, optimizer]); got {type(res).__name__}")


def run(args: argparse.Namespace) -> int:
    from . import DoctorInputError, doctor
    try:
        fac = load_factory(args.factory)
        model, loss_fn, data, opt, kw = unpack(fac())
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        print(f"trainguard doctor: cannot load {args.factory}: {e}", file=sys.stderr)
        return 2
    kw.setdefault("steps", args.steps)
    if args.no_precision:
        kw["precision"] = False
    if args.no_lr_range:
        kw["lr_range"] = False
    try:
        rep = doctor(model, loss_fn, data, optimizer=opt, progress=True, **kw)
    except DoctorInputError as e:
        print(f"trainguard doctor: {e}", file=sys.stderr)
        return 2
    text = rep.summary()
    try:
        from rich.console import Console
        Console(highlight=False).print(text, markup=False)
    except ImportError:
        print(text)
    if args.json:
        rep.save_json(args.json)
        print(f"wrote {args.json}")
    if args.html:
        rep.save_html(args.html)
        print(f"wrote {args.html}")
    return 1 if args.fail_on_findings and not rep.healthy else 0
