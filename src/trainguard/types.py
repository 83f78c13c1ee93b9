"""Plain records shared by every part of trainguard: StepStats, Finding, Action.

Nothing here imports torch, so detectors, policy and sinks can be tested on synthetic
streams and reused by any framework adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

#: Finding kinds the Guard emits (stable identifiers, relied on by users' code).
FINDING_KINDS = (
    "nonfinite",
    "loss_spike",
    "grad_explosion",
    "vanishing_gradient",
    "dead_units",
    "saturation",
    "divergence",
    "plateau",
)

#: Action kinds the Guard takes (stable identifiers).
ACTION_KINDS = ("clip", "skip", "lr_backoff", "rollback", "halt", "restructure")

#: Finding kinds that count as an alarm (a false alarm if raised on a healthy run).
SEVERE_KINDS = frozenset(
    {"nonfinite", "loss_spike", "grad_explosion", "vanishing_gradient", "dead_units",
     "saturation", "divergence"}
)

#: Where a non-finite value came from (``Finding.origin``).
ORIGINS = ("input", "forward", "loss", "backward", "optimizer", "parameters")

#: What to change, in the classic toolbox's words, for each finding kind.
REMEDIES: dict[str, tuple[str, ...]] = {
    "nonfinite": (
        "lower the learning rate or add warmup",
        "clip gradients (trainguard clips adaptively by default)",
        "check the input data for NaN/Inf",
        "in fp16, keep softmax/attention/loss in fp32 or switch to bf16",
    ),
    "loss_spike": (
        "skip the offending batch (done automatically) and check it for bad data",
        "lower the learning rate or lower Adam's beta2 (0.999 -> 0.95)",
        "add warmup; clip gradients",
    ),
    "grad_explosion": (
        "clip the gradient norm (Pascanu 2013: threshold near the running average norm)",
        "lower the learning rate",
        "for RNNs: orthogonal recurrent init with spectral radius <= 1, or use LSTM/GRU",
        "add normalisation (BatchNorm/LayerNorm)",
    ),
    "vanishing_gradient": (
        "use Xavier init for tanh/sigmoid, He init for ReLU",
        "switch sigmoid/tanh to ReLU/LeakyReLU/ELU/SELU",
        "add batch normalisation or residual connections; make the net shallower",
    ),
    "dead_units": (
        "lower the learning rate or add warmup",
        "switch ReLU to LeakyReLU/ELU/PReLU",
        "use He init; widen narrow layers",
    ),
    "saturation": (
        "use Xavier init (Glorot 2010) or normalise inputs",
        "switch sigmoid to tanh or ReLU; add batch normalisation",
    ),
    "divergence": (
        "lower the learning rate (the run is past the curvature limit 2/lambda_max)",
        "add warmup; clip gradients; add normalisation",
    ),
    "plateau": (
        "raise the learning rate or switch optimizer (SGD -> Adam)",
        "check init and activations (see vanishing_gradient / dead_units)",
        "use a plateau-driven schedule (ReduceLROnPlateau)",
    ),
}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


@dataclass
class StepStats:
    """Everything the probe measured at one training step, as plain Python numbers.

    Per-module arrays follow ``modules`` order (first parameter appearance, i.e. roughly
    input side first). ``None`` means "not measured at this step".
    """

    step: int
    loss: float
    grad_norm: float
    modules: Sequence[str] = ()
    grad_norms: Sequence[float] = ()
    param_norms: Sequence[float] | None = None
    param_norm: float | None = None
    update_ratios: Sequence[float] | None = None
    lr: float | None = None
    loss_scale: float | None = None
    scaler_overflow: bool = False
    #: sampled activation statistics: module name -> dict(kind, dead_fraction, saturated_fraction, second_moment, units)
    activations: dict[str, dict[str, Any]] | None = None
    #: sampled: mean log Z = logsumexp over the last dimension of the model's output when it
    #: looks like logits (2-3 dims, last >= 2), else None (see trainguard.detect.logits)
    output_log_z: float | None = None
    #: optimizer kind, e.g. "sgd", "adam" (for remedies that depend on it)
    optimizer: str | None = None
    #: sampled after the previous sampled update: "eps_dominated_fraction" (Adam-family:
    #: coordinates with 0 < sqrt(v_hat) < eps), "swamped_fraction" (16-bit parameters whose
    #: non-zero gradient left the stored weight unchanged), "eps"
    optimizer_state: dict[str, float] | None = None
    #: normalisation layers whose running statistics (BatchNorm running_mean/var) were found
    #: non-finite at this step (checked on the parameter-norm cadence and on non-finite steps)
    nonfinite_buffers: Sequence[str] = ()
    #: modules whose weights are finite but so large that their fp32 norm overflows (|w| of
    #: ~1e19 and more): corrupted, though not NaN/Inf
    huge_param_modules: Sequence[str] = ()
    #: modules whose optimizer state (Adam's exp_avg/exp_avg_sq, RMSprop's square_avg,
    #: Adagrad's sum, momentum buffers) holds NaN/Inf (checked on the parameter-norm cadence)
    nonfinite_optimizer_modules: Sequence[str] = ()
    #: False when the loop never showed the Guard this step's loss (a framework that keeps it,
    #: ``GuardedOptimizer.step()`` without a closure or ``observe_loss``) and the model returned
    #: none (:mod:`trainguard.model_loss`): ``loss`` is NaN and
    #: the loss-based detectors (spike, divergence, plateau) sit the step out
    loss_known: bool = True
    #: modules that had no gradient at this step although some of their parameters require one
    #: (the loss did not reach them: a branch unused at this step, a module used only outside
    #: training steps, a graph cut before them): their ``grad_norms`` entry is 0.0 by
    #: convention, not a measured zero
    missing_grad_modules: Sequence[str] = ()
    #: modules all of whose parameters are frozen (``requires_grad`` False) but held by the
    #: optimizer: no gradient expected; ``grad_norms`` 0.0 by convention
    frozen_modules: Sequence[str] = ()

    @property
    def loss_finite(self) -> bool:
        """The loss is finite, or unknown (an unknown loss is not evidence of anything)."""
        return not self.loss_known or _finite(self.loss)

    @property
    def loss_usable(self) -> bool:
        """The loss is known and finite: the loss-based detectors may read it."""
        return self.loss_known and _finite(self.loss)

    @property
    def grads_finite(self) -> bool:
        return _finite(self.grad_norm)

    @property
    def params_finite(self) -> bool:
        return self.param_norm is None or _finite(self.param_norm)

    def nonfinite_modules(self) -> list[str]:
        return [m for m, g in zip(self.modules, self.grad_norms) if not math.isfinite(g)]

    def nonfinite_param_modules(self) -> list[str]:
        if self.param_norms is None:
            return []
        return [m for m, g in zip(self.modules, self.param_norms) if not math.isfinite(g)]


@dataclass
class Finding:
    """Something a detector noticed.

    ``kind`` is one of :data:`FINDING_KINDS` (or a doctor-only kind); ``where`` is the
    module or parameter path in the user's model ("" when the finding is about the whole
    run); ``locations`` lists every place involved; ``evidence`` holds the numbers behind
    the finding; ``remedies`` says what to change.
    """

    kind: str
    step: int
    message: str
    where: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    severity: str = "warning"
    locations: tuple[str, ...] = ()
    origin: str | None = None
    remedies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.remedies:
            self.remedies = REMEDIES.get(self.kind, ())
        if self.where and not self.locations:
            self.locations = (self.where,)

    @property
    def severe(self) -> bool:
        return self.kind in SEVERE_KINDS

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "step": self.step, "where": self.where,
            "locations": list(self.locations), "origin": self.origin,
            "severity": self.severity, "message": self.message,
            "evidence": dict(self.evidence), "remedies": list(self.remedies),
        }

    def __str__(self) -> str:
        at = f" in {self.where}" if self.where else ""
        return f"[step {self.step}] {self.kind}{at}: {self.message}"


@dataclass
class Action:
    """Something the Guard did about a finding: ``kind`` is one of :data:`ACTION_KINDS`."""

    kind: str
    step: int
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "reason": self.reason,
                "detail": dict(self.detail)}

    def __str__(self) -> str:
        return f"[step {self.step}] {self.kind}: {self.reason}"


class TrainingUnstable(RuntimeError):
    """Raised when the Guard's repairs are exhausted; carries the findings and actions."""

    def __init__(self, message: str, findings: Sequence[Finding] = (),
                 actions: Sequence[Action] = ()) -> None:
        super().__init__(message)
        self.findings = list(findings)
        self.actions = list(actions)
