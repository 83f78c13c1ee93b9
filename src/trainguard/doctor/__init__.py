"""The Doctor: diagnose a model before training and repair it structurally.

    report = tg.doctor(model, loss_fn, data, optimizer=optimizer)
    report.findings, report.prescriptions, report.max_stable_lr
    report.save_html("doctor.html")

    result = tg.repair(model_fn, optimizer_fn, loss_fn, data, steps=600, metric=metric_fn)
    result.model, result.metric, result.baseline_metric, result.changes

See docs/doctor.md for what is measured, every threshold and its source.
"""
from __future__ import annotations

from ._common import DoctorInputError
from ._doctor import doctor
from .prescribe import Prescription
from .repair import REMEDY_MENU, RepairResult, apply_remedy, repair
from .report import DoctorReport

#: Finding kinds only the doctor emits (the Guard's kinds keep their meaning).
DOCTOR_KINDS = (
    "activation_collapse", "activation_explosion", "lr_too_high", "lr_too_low",
    "batch_too_small", "adam_epsilon", "precision_overflow", "precision_underflow",
    "precision_sensitive", "precision_swamping",
)

__all__ = ["doctor", "repair", "DoctorReport", "RepairResult", "Prescription",
           "DoctorInputError", "DOCTOR_KINDS", "REMEDY_MENU", "apply_remedy"]


# ``import trainguard.doctor`` binds the *package* to ``trainguard.doctor``, shadowing the
# lazily exported function after first use; making the package callable keeps
# ``tg.doctor(model, loss_fn, data, ...)`` working either way.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return doctor(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
