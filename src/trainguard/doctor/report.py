"""The doctor's report: findings, ranked prescriptions and every measurement behind them."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..types import Finding
from ._common import fmt
from .curvature import Curvature
from .lr_range import RangeTest
from .noise import NoiseScale
from .precision import PrecisionAudit
from .prescribe import Prescription
from .propagation import LayerVerdict


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become strings, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return _clean(obj.to_dict())
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


def atomic_write(path: str | os.PathLike, data: str) -> None:
    """Write durably and atomically (temporary file, fsync, os.replace, fsync the folder)."""
    from .._fsio import atomic_write as _write
    _write(path, lambda fh: fh.write(data))


@dataclass
class DoctorReport:
    findings: list[Finding]
    prescriptions: list[Prescription]
    #: the largest stable learning rate from curvature for the given optimizer
    max_stable_lr: float
    #: a learning rate to use (curvature limit and range test combined)
    suggested_lr: float
    #: suggested linear warmup length in steps (0 = none needed)
    warmup_steps: int
    lr: float
    optimizer: str
    model_name: str = ""
    layers: list[LayerVerdict] = field(default_factory=list)
    curvature: Curvature | None = None
    range_test: RangeTest | None = None
    noise: NoiseScale | None = None
    precision: PrecisionAudit | None = None
    trial_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def healthy(self) -> bool:
        """No finding of severity warning or error."""
        return not any(f.severity in ("warning", "error") for f in self.findings)

    @property
    def kinds(self) -> list[str]:
        return sorted({f.kind for f in self.findings})

    @property
    def limit_note(self) -> str:
        """Why :attr:`max_stable_lr` is no guide, or "": an adaptive optimizer's limit is
        measured after the trial steps (its preconditioner needs them), and when those blew up
        or diverged (a finding that quotes ``calm_lr``, the LR whose retried trial stayed
        calm) it was measured on the weights they wrecked: a small transformer at Adam 0.3
        read 580, a DDPM denoiser at 2e-2 66 (tests/test_doctor_blowup.py)."""
        if any("calm_lr" in f.evidence for f in self.findings):
            return "measured after trial steps that blew up: not a guide"
        return ""

    def summary(self) -> str:
        lines = [f"trainguard doctor: {self.model_name or 'model'} — "
                 + ("healthy" if self.healthy else f"{sum(f.severity != 'info' for f in self.findings)} problem(s)")]
        note = f" [{self.limit_note}]" if self.limit_note else ""
        lines.append(f"  optimizer {self.optimizer}, lr {fmt(self.lr)}; max stable lr {fmt(self.max_stable_lr)}"
                     f"{note} (λ_max {fmt(self.curvature.lambda_max) if self.curvature else '-'}); suggested lr "
                     f"{fmt(self.suggested_lr)}" + (f", warmup {self.warmup_steps} steps" if self.warmup_steps else ""))
        if self.noise is not None:
            lines.append(f"  gradient noise scale B_simple {fmt(self.noise.b_simple)} at batch {self.noise.batch}")
        if self.precision is not None:
            for f_, v in self.precision.can_train.items():
                lines.append(f"  {f_}: {v}")
            if self.precision.reference != "fp64":
                lines.append(f"  precision errors measured against {self.precision.reference}")
        bad = [lv for lv in self.layers if lv.verdict != "healthy"]
        lines.append(f"  layers: {len(self.layers)} tracked, {len(bad)} unhealthy"
                     + (": " + ", ".join(f"{lv.name}={lv.verdict}" for lv in bad[:6]) + ("..." if len(bad) > 6 else "")
                        if bad else ""))
        if self.findings:
            lines.append("findings:")
            lines.extend(f"  [{f.severity}] {f.kind}{' in ' + f.where if f.where else ''}: {f.message}"
                         for f in self.findings)
        if self.prescriptions:
            lines.append("prescriptions:")
            lines.extend(f"  {p}" for p in self.prescriptions)
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "model": self.model_name, "healthy": self.healthy,
            "findings": [f.to_dict() for f in self.findings],
            "prescriptions": [p.to_dict() for p in self.prescriptions],
            "max_stable_lr": self.max_stable_lr, "limit_note": self.limit_note,
            "suggested_lr": self.suggested_lr,
            "warmup_steps": self.warmup_steps, "lr": self.lr, "optimizer": self.optimizer,
            "layers": [lv.to_dict() for lv in self.layers],
            "curvature": self.curvature, "range_test": self.range_test, "noise": self.noise,
            "precision": self.precision, "trial_losses": self.trial_losses,
            "seconds": self.seconds,
        })

    def save_json(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2))

    def save_html(self, path: str | os.PathLike) -> None:
        """A self-contained HTML file (inline PNG plots; needs matplotlib for the plots)."""
        from .html import render
        atomic_write(path, render(self))
