"""Running statistics that a forward pass writes (BatchNorm/InstanceNorm ``running_mean``,
``running_var``, ``num_batches_tracked``), kept so that a skipped batch leaves no trace.

A skip keeps parameters and optimizer state untouched, but the skipped batch's forward pass has
already updated the normalisation layers' running statistics: a NaN/Inf batch writes NaN into
them, a batch of huge values an overflowing variance, and the model then outputs NaN in eval
mode although training-mode losses recover (issue #12, item 2). Training mode never reads them,
so a copy a few steps old is as good as the current one: the Guard checks their norms on the
parameter-norm cadence (every ``param_norm_every`` steps, in the step's one transfer) and at
once on any non-finite step, keeps a copy whenever they are verified finite, and restores that
copy on every skip and whenever they are found non-finite. Cost on a healthy step: nothing;
every tenth step one fused norm over these small tensors and one copy of them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..names import clean_name
from ..stats import _local


class RunningStats:
    """The running statistics of ``model``'s normalisation layers, and a verified copy."""

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []  # module path of each float buffer
        self.floats: list[torch.Tensor] = []
        self.all: list[torch.Tensor] = []
        for mname, mod in model.named_modules():
            if not isinstance(mod, nn.modules.batchnorm._NormBase) or not mod.track_running_stats:
                continue
            for bname, b in mod.named_buffers(recurse=False):
                if b is None:
                    continue
                t = _local(b)
                self.all.append(t)
                if t.is_floating_point():
                    self.floats.append(t)
                    self.names.append(clean_name(mname))
        self.copy = [t.detach().clone() for t in self.all]
        # a norm cannot be taken in a narrower type than its input (float64 models)
        self.dtype = (torch.float64 if any(t.dtype == torch.float64 for t in self.floats)
                      else torch.float32)

    def __bool__(self) -> bool:
        return bool(self.floats)

    def norms(self) -> torch.Tensor:
        """Per-buffer L2 norms (fp32, fp64 for float64 models) on the device, for the step's
        one transfer."""
        with torch.no_grad():
            return torch.stack(torch._foreach_norm(self.floats, 2, dtype=self.dtype))

    def keep(self) -> None:
        """Remember the current values (call when they were just verified finite)."""
        with torch.no_grad():
            torch._foreach_copy_(self.copy, self.all)

    def restore(self) -> None:
        """Put the last verified values back, in place."""
        with torch.no_grad():
            torch._foreach_copy_(self.all, self.copy)
