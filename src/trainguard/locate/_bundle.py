"""Reproducer bundles: everything needed to re-run one failing step, without pickles.

Layout of a bundle directory (written into a temporary directory next to it, then moved
into place with ``os.replace``, so a reader never sees half a bundle)::

    manifest.json          step, origin, where, message, dtypes, autocast, RNG presence,
                           model_factory ("module:callable"), input/output structure
    model.<ext>            the model's state_dict (pre-step weights)
    optimizer.<ext>        optimizer state tensors (non-tensor state goes in the manifest)
    batch.<ext>            the model's inputs (args/kwargs tensors)
    grads.<ext>            the gradients that flowed into the model's outputs
    rng.<ext>              CPU (and CUDA) RNG states

``<ext>`` is ``safetensors`` when the ``safetensors`` package is installed, else ``pt``: a
``torch.save`` of a flat ``dict[str, Tensor]`` that is read back with
``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import torch

from .._fsio import fsync_dir, fsync_tree

FORMAT_VERSION = 1


class BundleError(ValueError):
    """A reproducer bundle is missing, incomplete or malformed."""


def _have_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
        return True
    except ImportError:
        return False


def save_tensors(tensors: Mapping[str, torch.Tensor], path_stem: str) -> str:
    """Write a flat dict of tensors; returns the file name written."""
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    if hasattr(next(iter(flat.values()), None), "_local_tensor"):  # pragma: no cover
        flat = {k: v._local_tensor for k, v in flat.items()}
    if _have_safetensors():
        from safetensors.torch import save_file
        path = path_stem + ".safetensors"
        save_file(flat, path)
    else:
        path = path_stem + ".pt"
        torch.save(flat, path)
    return os.path.basename(path)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        if not _have_safetensors():
            raise BundleError(f"{path} needs the safetensors package: pip install safetensors")
        from safetensors.torch import load_file
        return dict(load_file(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BundleError(f"{path} is not a flat dict of tensors")
    return obj


# ---------------------------------------------------------------------------- structures
def encode(obj: Any, key: str, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """A JSON description of nested args, tensors stored under generated keys."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"t": "tensor", "key": key}
    if depth > 8:
        return {"t": "unsupported", "type": type(obj).__name__}
    if obj is None or isinstance(obj, (bool, int, str)):
        return {"t": "value", "v": obj}
    if isinstance(obj, float):
        return {"t": "float", "v": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"t": "dtype", "v": str(obj)}
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
        return {"t": "dict", "items": {k: encode(v, f"{key}.{k}", tensors, depth + 1)
                                       for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return {"t": type(obj).__name__,
                "items": [encode(v, f"{key}.{i}", tensors, depth + 1) for i, v in enumerate(obj)]}
    return {"t": "unsupported", "type": type(obj).__name__}


def decode(spec: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    t = spec.get("t") if isinstance(spec, dict) else None
    if t == "tensor":
        if spec["key"] not in tensors:
            raise BundleError(f"tensor {spec['key']!r} is missing from the bundle")
        return tensors[spec["key"]]
    if t == "value":
        return spec["v"]
    if t == "float":
        return float(spec["v"])
    if t == "dtype":
        return getattr(torch, spec["v"].replace("torch.", ""))
    if t == "dict":
        return {k: decode(v, tensors) for k, v in spec["items"].items()}
    if t in ("list", "tuple"):
        items = [decode(v, tensors) for v in spec["items"]]
        return tuple(items) if t == "tuple" else items
    if t == "unsupported":
        raise BundleError(f"the bundle could not store an input of type {spec.get('type')}; "
                          "replay needs inputs made of tensors, numbers, strings, lists and dicts")
    raise BundleError(f"malformed structure in the manifest: {spec!r}")


def _json_safe(obj: Any, depth: int = 0) -> Any:
    if depth > 6:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return _json_safe(obj.item(), depth + 1)
    return repr(obj)


def _optimizer_parts(optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    # an OptimizerChain's state_dict holds each optimizer's: "opt<k>." before their keys
    parts = ([(f"opt{k}.", sub) for k, sub in enumerate(sd["optimizers"])]
             if isinstance(sd.get("optimizers"), list) else [("", sd)])
    groups: list[Any] = []
    for prefix, sub in parts:
        for idx, st in sub.get("state", {}).items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{prefix}state.{idx}.{k}"] = v
                else:
                    scalars.setdefault(f"{prefix}{idx}", {})[k] = _json_safe(v)
        groups += sub.get("param_groups", [])
    meta = {"type": type(optimizer).__name__, "param_groups": _json_safe(groups),
            "scalar_state": scalars}
    return tensors, meta


# ---------------------------------------------------------------------------- write / read
def write_bundle(root: str, *, step: int, location: Any, model: torch.nn.Module,
                 args: tuple, kwargs: dict, grad_outputs: list, rng: torch.Tensor | None,
                 cuda_rng: list | None, autocast: Mapping[str, Any] | None, training: bool,
                 grad_enabled: bool, optimizer: Any = None, scaler: Any = None,
                 model_factory: str | None = None, rank: int = 0) -> str:
    """Write one bundle under ``root`` atomically; returns its path."""
    os.makedirs(root, exist_ok=True)
    name = f"step{step:07d}-{location.origin or 'unknown'}" + (f"-rank{rank}" if rank else "")
    final = os.path.join(root, name)
    n = 1
    while os.path.exists(final):
        n += 1
        final = os.path.join(root, f"{name}-{n}")
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        files: dict[str, str] = {}
        sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        if sd:
            files["model"] = save_tensors(sd, os.path.join(tmp, "model"))
        opt_meta = None
        if optimizer is not None:
            ot, opt_meta = _optimizer_parts(optimizer)
            if ot:
                files["optimizer"] = save_tensors(ot, os.path.join(tmp, "optimizer"))
        bt: dict[str, torch.Tensor] = {}
        inputs = {"args": encode(tuple(args), "args", bt), "kwargs": encode(dict(kwargs), "kwargs", bt)}
        if bt:
            files["batch"] = save_tensors(bt, os.path.join(tmp, "batch"))
        gt = {f"out.{i}": g for i, g in enumerate(grad_outputs) if g is not None}
        if gt:
            files["grads"] = save_tensors(gt, os.path.join(tmp, "grads"))
        rt: dict[str, torch.Tensor] = {}
        if rng is not None:
            rt["cpu"] = rng
        for i, s in enumerate(cuda_rng or []):
            rt[f"cuda.{i}"] = s
        if rt:
            files["rng"] = save_tensors(rt, os.path.join(tmp, "rng"))
        dtypes: dict[str, int] = {}
        for p in model.parameters():
            dtypes[str(p.dtype).replace("torch.", "")] = dtypes.get(str(p.dtype).replace("torch.", ""), 0) + 1
        device = next((str(p.device.type) for p in model.parameters()), "cpu")
        manifest = {
            "format": "trainguard-repro", "version": FORMAT_VERSION,
            "step": step, "rank": rank, "origin": location.origin, "where": location.where,
            "locations": list(location.locations), "message": location.message,
            "evidence": _json_safe(location.evidence),
            "model_factory": model_factory, "model_class": type(model).__qualname__,
            "training": bool(training), "grad_enabled": bool(grad_enabled),
            "autocast": _json_safe(autocast or {}), "param_dtypes": dtypes, "device": device,
            "n_outputs": len(grad_outputs), "inputs": inputs, "files": files,
            "optimizer": opt_meta,
            "scaler": _json_safe(scaler.state_dict()) if scaler is not None and hasattr(scaler, "state_dict") else None,
            "torch": torch.__version__,
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        # durable before visible: every file and the folder reach the disk before the rename,
        # and the parent folder (the rename itself) after it (issue #12, item 11)
        fsync_tree(tmp)
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(os.path.abspath(final)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class Bundle:
    """A loaded reproducer bundle (tensors on the CPU)."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise BundleError(f"{path} is not a directory (expected a trainguard reproducer bundle)")
        mpath = os.path.join(path, "manifest.json")
        if not os.path.isfile(mpath):
            raise BundleError(f"{path} has no manifest.json: not a trainguard reproducer bundle")
        try:
            with open(mpath) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read {mpath}: {e}") from e
        if not isinstance(m, dict) or m.get("format") != "trainguard-repro":
            raise BundleError(f"{mpath} is not a trainguard reproducer manifest")
        if m.get("version") != FORMAT_VERSION:
            raise BundleError(f"bundle format version {m.get('version')} is not supported "
                              f"(this trainguard reads version {FORMAT_VERSION})")
        files = m.get("files", {})
        if not isinstance(files, dict):
            raise BundleError(f"{mpath}: 'files' must map parts to file names")
        for part, fname in files.items():
            # a manifest is data from elsewhere: its file names stay inside the bundle
            if (not isinstance(fname, str) or not fname or os.path.isabs(fname)
                    or fname != os.path.basename(fname) or fname in (".", "..")
                    or os.path.realpath(os.path.join(path, fname)) != os.path.join(
                        os.path.realpath(path), fname)):
                raise BundleError(f"{mpath}: file entry {part!r} = {fname!r} points outside the "
                                  "bundle: refusing to read it")
        self.path, self.manifest = path, m
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def tensors(self, part: str) -> dict[str, torch.Tensor]:
        if part not in self._cache:
            fname = self.manifest.get("files", {}).get(part)
            if fname is None:
                self._cache[part] = {}
            else:
                fpath = os.path.join(self.path, fname)
                if not os.path.isfile(fpath):
                    raise BundleError(f"{fpath} is missing from the bundle")
                self._cache[part] = load_tensors(fpath)
        return self._cache[part]

    def inputs(self) -> tuple[tuple, dict]:
        bt = self.tensors("batch")
        spec = self.manifest["inputs"]
        return tuple(decode(spec["args"], bt)), dict(decode(spec["kwargs"], bt))

    def grad_outputs(self) -> list[torch.Tensor | None]:
        gt = self.tensors("grads")
        return [gt.get(f"out.{i}") for i in range(int(self.manifest.get("n_outputs", 0)))]

    def rng(self) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
        rt = self.tensors("rng")
        cuda = [rt[k] for k in sorted((k for k in rt if k.startswith("cuda.")),
                                      key=lambda k: int(k.split(".")[1]))]
        return rt.get("cpu"), (cuda or None)

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.tensors("model")

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return self.tensors("optimizer")
