"""Module paths as the user's model names them (torch-free).

Wrappers insert segments into every parameter and module path: ``_orig_mod`` (torch.compile),
``_checkpoint_wrapped_module`` (activation checkpointing), ``_fsdp_wrapped_module`` (FSDP1) and
a leading ``module`` (DistributedDataParallel, DataParallel). Every name a user sees in
findings, locate, bundles and reports goes through :func:`clean_name`, so a compiled or wrapped
model is reported with the same names as the bare one.
"""
from __future__ import annotations

WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def clean_name(name: str, root: str = "(root)") -> str:
    """``name`` with wrapper segments removed; ``root`` for the empty path."""
    parts = [p for p in name.split(".") if p and p not in WRAPPER_SEGMENTS]
    if parts and parts[0] == "module" and name.startswith("module."):
        # DDP's prefix (only when the path came from the wrapper itself)
        parts = parts[1:]
    return ".".join(parts) or root
