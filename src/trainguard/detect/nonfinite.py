"""Non-finite values: NaN/Inf in the loss, the gradients, the parameters or the running
statistics of normalisation layers (origin ``buffers``).

Rule: any non-finite loss, gradient norm or parameter norm is a finding at the step it
occurs, with one exception taken from PyTorch's GradScaler design (``torch/amp/grad_scaler.py``):
under fp16 loss scaling, an overflow of the *scaled* gradients while the loss is finite is
the scaler's own business (it skips the step and halves the scale) and is not instability.
It becomes a finding once the scale has collapsed below ``min_loss_scale``: then the
gradients overflow even without scaling, the failure mode behind "Current loss scale already
at minimum" crashes (DeepSpeed, see research/prior-art-tools.md §2.3).
"""
from __future__ import annotations

import math

from ..types import Finding, StepStats
from .base import Detector


class NonFiniteDetector(Detector):
    kind = "nonfinite"
    _state = ("scaler_overflows",)

    def __init__(self, min_loss_scale: float = 1.0) -> None:
        #: A GradScaler scale below this means the unscaled gradients themselves overflow.
        #: 1.0 is the point where scaling no longer adds any headroom (Micikevicius 2018).
        self.min_loss_scale = float(min_loss_scale)
        self.scaler_overflows = 0

    def update(self, s: StepStats) -> list[Finding]:
        loss_ok = s.loss_finite
        if (loss_ok and s.grads_finite and s.params_finite and not s.huge_param_modules
                and not s.nonfinite_buffers and not s.nonfinite_optimizer_modules):
            return []  # the common step: everything finite, nothing huge
        bad_params = s.nonfinite_param_modules() if not s.params_finite else []
        huge = list(s.huge_param_modules)
        if huge and not bad_params:
            return [Finding(
                kind="nonfinite", step=s.step, where=huge[0], locations=tuple(huge),
                severity="critical", origin="parameters",
                message=(f"the weights of {', '.join(huge[:3])}{' ...' if len(huge) > 3 else ''}"
                         f" are finite but huge (weight norm {s.param_norm:.3g}, above 1e15: "
                         "a runaway update, a load or a bit flip corrupted them)"),
                evidence={"loss": s.loss, "grad_norm": s.grad_norm, "param_norm": s.param_norm,
                          "huge_param_modules": huge},
            )]
        bad_bufs = list(s.nonfinite_buffers)
        bad_opt = list(s.nonfinite_optimizer_modules)
        if bad_opt and loss_ok and s.grads_finite and not bad_params:
            return [Finding(
                kind="nonfinite", step=s.step, where=bad_opt[0], locations=tuple(bad_opt),
                severity="critical", origin="optimizer",
                message=(f"the optimizer state of {', '.join(bad_opt[:3])}"
                         f"{' ...' if len(bad_opt) > 3 else ''} holds NaN/Inf or absurd values "
                         "(norm above 1e15: Adam's exp_avg_sq overflowed or was corrupted): "
                         "those weights silently stop moving"),
                evidence={"loss": s.loss, "grad_norm": s.grad_norm,
                          "nonfinite_optimizer_modules": bad_opt},
                remedies=("roll back to a snapshot with finite optimizer state",
                          "clip gradients; under fp16 keep the optimizer state in fp32"),
            )]
        if loss_ok and s.grads_finite and not bad_params and not bad_bufs:
            return []
        if loss_ok and s.grads_finite and not bad_params:
            where = bad_bufs
            return [Finding(
                kind="nonfinite", step=s.step, where=where[0], locations=tuple(where),
                severity="critical", origin="buffers",
                message=(f"the running statistics of {', '.join(where[:3])}"
                         f"{' ...' if len(where) > 3 else ''} hold NaN/Inf (a batch's forward "
                         "pass wrote them: eval-mode outputs would be NaN); restored from the "
                         "last verified copy"),
                evidence={"loss": s.loss, "grad_norm": s.grad_norm,
                          "nonfinite_buffer_modules": where},
                remedies=("check the data pipeline for NaN/Inf or huge inputs",
                          "normalise the inputs; clip or skip outlier batches"),
            )]
        if (s.loss_scale is not None and loss_ok and not bad_params
                and s.loss_scale >= self.min_loss_scale):
            # The scaler's own overflow skip: record, do not alarm.
            self.scaler_overflows += 1
            return []
        bad_grads = s.nonfinite_modules()
        if bad_params:
            origin, where = "parameters", bad_params
            what = "parameters hold NaN/Inf (a previous update or a load corrupted them)"
        elif not loss_ok:
            origin, where = None, bad_grads
            what = f"the loss is {s.loss}"
        else:
            origin, where = "backward", bad_grads
            what = (f"the gradient norm is {s.grad_norm} while the loss is finite ({s.loss:.4g})"
                    if s.loss_known else f"the gradient norm is {s.grad_norm}")
        if s.loss_scale is not None and loss_ok and not bad_params:
            what += (f"; the fp16 loss scale has collapsed to {s.loss_scale:g}, so gradients "
                     "overflow even unscaled")
        places = ", ".join(where[:3]) + (" ..." if len(where) > 3 else "")
        msg = what + (f"; non-finite gradients in {places}" if where and origin != "parameters"
                      else (f"; non-finite parameters in {places}" if where else ""))
        return [Finding(
            kind="nonfinite", step=s.step, message=msg, where=where[0] if where else "",
            locations=tuple(where), severity="critical", origin=origin,
            evidence={"loss": s.loss, "grad_norm": s.grad_norm,
                      "param_norm": s.param_norm, "loss_scale": s.loss_scale,
                      "nonfinite_grad_modules": bad_grads,
                      "nonfinite_param_modules": bad_params},
        )]


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
