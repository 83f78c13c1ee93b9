"""Prescriptions: findings turned into concrete, ranked changes in the classic toolbox's
words (init, activation, normalisation, residual scaling, LR/warmup, optimizer/epsilon,
clipping, batch size, precision). Each prescription names the finding that motivates it,
where to change, and the expected effect with its source (research/mechanisms.md).

``remedy`` is a machine-readable key that :func:`trainguard.doctor.repair` can apply:
``act:relu``, ``act:leaky``, ``init:he``, ``init:xavier``, ``init:orthogonal``,
``init:lsuv``, ``init:zero_last``, ``norm:batchnorm``, ``norm:layernorm``, ``lr:<value>``,
``opt:adam``, ``opt:eps``, joined with ``+`` for combinations; "" when it is a manual change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..detect.units import SMOOTH_KINDS
from ..stats import activation_kind
from ..types import Finding

#: Mechanism priority: what blocks learning first is fixed first (non-finite values and
#: divergence end the run; dead/vanishing signal makes the rest irrelevant).
PRIORITY = {
    "nonfinite": 10, "divergence": 9, "dead_units": 8, "vanishing_gradient": 8,
    "activation_collapse": 8, "activation_explosion": 8, "grad_explosion": 7, "lr_too_high": 7,
    "saturation": 6, "batch_too_small": 4, "adam_epsilon": 3, "precision_overflow": 3,
    "precision_underflow": 2, "precision_sensitive": 2, "precision_swamping": 1, "lr_too_low": 1,
}
_SEV = {"error": 3.0, "warning": 2.0, "info": 1.0}


@dataclass
class Prescription:
    rank: int
    action: str  # what to change, concretely
    where: tuple[str, ...]  # module names in the user's model ("" = whole run)
    why: str  # the finding that motivates it
    expected: str  # expected effect, with its source
    finding: str  # the finding kind
    remedy: str = ""  # key for repair(); "" = manual change
    score: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, where=list(self.where))

    def __str__(self) -> str:
        at = f" [{', '.join(self.where[:4])}{'...' if len(self.where) > 4 else ''}]" if self.where else ""
        return f"{self.rank}. {self.action}{at} — because {self.why}; expected: {self.expected}"


def _acts(model: nn.Module) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        k = activation_kind(m)
        if k:
            out.setdefault(k, []).append(name)
    return out


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def _has_norm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
               for m in model.modules())


#: a network whose hidden widths have ``sum(1/width) >= DEEP_NARROW`` is deep for its width:
#: LSUV (which measures and sets each layer's scale on a batch) goes before He init. Hanin &
#: Rolnick 2018 (arXiv 1803.01719): under He init the *expected* activation scale is constant,
#: but its spread from one draw to the next grows with beta = sum over hidden layers of 1/width
#: (depth/width at constant width), so a deep, narrow net may start far from unit scale. Measured
#: on the zoo's 30 x 128 ReLU/Xavier net (beta 0.23; ``python bench/lsuv_vs_he.py``, one
#: doctor trial each, seeds 0-3): He init 1.03 / 1.92 / 0.66 /
#: 1.20 held-out cross-entropy (2 of 4 below the criterion 1.0), LSUV 0.82 / 0.44 / 0.70 / 0.51
#: (4 of 4); on the bench's own 30 x 128 case both pass 3 of 3 (accuracy 0.895 / 0.895 / 0.895 and
#: 0.901 / 0.895 / 0.877 against >= 0.85). 0.1: between that net and the shallow nets people
#: train (a 64-128-64-10 MLP: 0.023; the zoo's 10 x 256 sigmoid stack: 0.039).
DEEP_NARROW = 0.1


def width_depth_ratio(model: nn.Module) -> float:
    """beta = sum of 1/width over the hidden weight layers (all but the last), widths being
    output features or channels (see :data:`DEEP_NARROW`)."""
    ws = [m.weight.shape[0] for m in model.modules()
          if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight.dim() >= 2]
    return float(sum(1.0 / w for w in ws[:-1] if w > 0))


def init_style(model: nn.Module) -> str:
    """"he", "xavier" or "" from the median of Var[W]·fan_in over weight layers (He: 2,
    Xavier on square layers: 1, PyTorch default U[±1/√n]: 1/3)."""
    import statistics
    vals = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight.numel() > 1:
            fan_in = m.weight[0].numel()
            vals.append(float(m.weight.detach().float().var()) * fan_in)
    if not vals:
        return ""
    g = statistics.median(vals)
    return "he" if 1.5 <= g <= 2.7 else ("xavier" if 0.75 <= g < 1.5 else "")


def prescribe(findings: list[Finding], model: nn.Module, ctx: dict[str, Any]) -> list["Prescription"]:
    """``ctx``: lr, optimizer kind, suggested_lr, max_stable_lr, warmup_steps, clip_norm
    (clip_lr: the LR of the calm trial it was measured after, when the trial at lr blew up),
    noise (NoiseScale|None), residual_blocks (names), precision (PrecisionAudit|None)."""
    acts = _acts(model)
    lins = _linears(model)
    sat_acts = {k: v for k, v in acts.items() if k in ("sigmoid", "tanh", "hardtanh", "hardsigmoid")}
    relu_acts = {k: v for k, v in acts.items() if k in ("relu", "relu6")}
    out: list[tuple[float, Prescription]] = []
    seen: set[str] = set()

    def add(f: Finding, action: str, where, expected: str, remedy: str = "", bonus: float = 0.0) -> None:
        key = remedy or action
        if key in seen:
            return
        seen.add(key)
        score = PRIORITY.get(f.kind, 1) * _SEV.get(f.severity, 1.0) + bonus
        out.append((score, Prescription(0, action, tuple(where), f"{f.kind}: {f.message}",
                                        expected, f.kind, remedy, score)))

    lr = ctx.get("lr")
    sug = ctx.get("suggested_lr")
    style = init_style(model)
    for f in findings:
        k = f.kind
        if k in ("vanishing_gradient", "activation_collapse", "saturation"):
            if sat_acts:
                names = [n for v in sat_acts.values() for n in v]
                kinds = "/".join(f"nn.{_cls(a)}" for a in sat_acts)
                chi = f.evidence.get("chi_per_layer")
                tanh_only = set(sat_acts) <= {"tanh", "hardtanh"}
                if tanh_only and k != "saturation":
                    add(f, f"re-initialise the {len(lins)} weight layers orthogonally with gain 1 "
                        "(nn.init.orthogonal_; σ_w²=1, the χ₁=1 critical point for tanh)", lins,
                        "dynamical isometry: tanh nets at criticality with orthogonal weights learn "
                        "orders of magnitude faster (Pennington 2017, mechanisms §2.10)"
                        + (f"; measured χ per layer {chi:.3g}" if isinstance(chi, float) and math.isfinite(chi) else ""),
                        "init:orthogonal", bonus=0.6)
                add(f, f"replace {kinds} with nn.ReLU in {len(names)} layers and re-initialise the "
                    f"{len(lins)} weight layers with He init (nn.init.kaiming_normal_, "
                    "nonlinearity='relu', zero bias)", names,
                    "He init keeps the second moment constant through ReLU layers (He 2015; last-layer "
                    "std 0.86 at depth 30 vs 2e-5 with Xavier, mechanisms §2.2); no saturation",
                    "act:relu+init:he", bonus=0.5)
                if not _has_norm(model):
                    add(f, f"insert nn.BatchNorm1d after each of the {max(0, len(lins) - 1)} hidden "
                        "Linear layers", lins[:-1],
                        "BatchNorm made sigmoid Inception trainable and reached the same accuracy in "
                        "14× fewer steps (Ioffe & Szegedy 2015, mechanisms §2.7)", "norm:batchnorm", bonus=0.4)
                add(f, f"re-initialise the {len(lins)} weight layers with Xavier init "
                    "(nn.init.xavier_uniform_), keeping the activation", lins,
                    "Var[W]=2/(n_in+n_out) keeps forward and backward variance constant for "
                    "sigmoid/tanh (Glorot 2010, mechanisms §2.1)", "init:xavier", bonus=0.2)
                add(f, "LSUV: orthonormal init, then rescale each layer to unit output variance on one "
                    "batch (tol 0.1, ≤10 iterations)", lins,
                    "\"measure q^l and fix it\" (Mishkin & Matas 2015, mechanisms §2.8)", "init:lsuv")
            elif style != "he":
                add(f, f"re-initialise the {len(lins)} weight layers with He init "
                    "(nn.init.kaiming_normal_, nonlinearity='relu', zero bias)", lins,
                    "He init keeps q^l constant through ReLU layers: last-layer std 0.86 at depth 30 "
                    "vs 2e-5 with Xavier (He 2015, mechanisms §2.2)", "init:he", bonus=0.5)
            if not sat_acts:
                beta = width_depth_ratio(model)
                deep = beta >= DEEP_NARROW
                add(f, "LSUV: orthonormal init, then rescale each layer to unit output variance on one "
                    "batch", lins, "mechanisms §2.8 (Mishkin & Matas 2015)"
                    + (f"; first for a net this deep for its width (sum of 1/width {beta:.2f}: He "
                       "init's realised scale varies from draw to draw, Hanin & Rolnick 2018)"
                       if deep else ""), "init:lsuv", bonus=0.6 if deep else 0.3)
                if not _has_norm(model):
                    add(f, f"insert nn.BatchNorm1d after each of the {max(0, len(lins) - 1)} hidden "
                        "Linear layers", lins[:-1],
                        "14× fewer steps on Inception (Ioffe & Szegedy 2015, mechanisms §2.7)",
                        "norm:batchnorm", bonus=0.2)
        elif k == "activation_explosion":
            blocks = ctx.get("residual_blocks") or []
            if blocks:
                add(f, f"zero-initialise the last weight layer of each of the {len(blocks)} residual "
                    "branches (Fixup rule 1 / ReZero α=0)", blocks,
                    "every block starts as the identity: output std 1.0 instead of ×3 variance per "
                    "block (Fixup: stable to 10,000 layers; ReZero: 56% faster, mechanisms §2.9)",
                    "init:zero_last", bonus=0.6)
            if not _has_norm(model):
                add(f, "add nn.LayerNorm after each hidden weight layer (pre-LN in residual branches)",
                    lins[:-1], "bounds every layer's second moment to ~1 (mechanisms §2.9, §2.7)",
                    "norm:layernorm", bonus=0.4)
            add(f, "LSUV: rescale each layer to unit output variance on one batch", lins,
                "mechanisms §2.8", "init:lsuv")
        elif k == "grad_explosion":
            if sat_acts:
                add(f, f"re-initialise the {len(lins)} weight layers orthogonally with gain 1 "
                    "(leave the chaotic phase: σ_w²=1 is critical for tanh)", lins,
                    "χ₁=1: gradients neither explode nor vanish (Schoenholz 2017, Pennington 2017, "
                    "mechanisms §2.10)", "init:orthogonal", bonus=0.6)
                add(f, "re-initialise with Xavier init", lins, "Glorot 2010 (mechanisms §2.1)",
                    "init:xavier", bonus=0.3)
            if not _has_norm(model):
                add(f, "add nn.LayerNorm after each hidden weight layer", lins[:-1],
                    "mechanisms §2.7/2.9", "norm:layernorm", bonus=0.2)
            clip = ctx.get("clip_norm")
            if clip:
                add(f, f"clip the gradient norm at {clip:.3g} "
                    "(torch.nn.utils.clip_grad_norm_; or let trainguard.Guard clip adaptively)", [],
                    "Pascanu 2013: a threshold at the running average norm; 0.5–10× still converges "
                    "(mechanisms §2.4)", "")
        elif k == "dead_units" and set(f.evidence.get("activations") or ["relu"]) <= SMOOTH_KINDS:
            # smooth units in their flat tail: pushed there by large steps (a DDPM denoiser's
            # SiLU layer at 30x its Adam LR, bench/diffusion_trial.py); nothing to swap
            if lr:
                add(f, f"lower the learning rate (now {lr:.3g}) or add warmup: large steps pushed "
                    "these units' pre-activations deep into the activation's flat negative tail",
                    f.locations, "a DDPM denoiser whose last SiLU layer died at Adam 3e-2 trains "
                    "at 1e-3 and 1e-2 (python bench/diffusion_trial.py)",
                    f"lr:{(sug or lr / 10):.6g}" if sug and sug < lr else "", bonus=0.5)
            if not _has_norm(model):
                add(f, "add nn.LayerNorm before each hidden activation", f.locations,
                    "re-centres and rescales the pre-activations every step, so no unit can sit "
                    "far out in the tail (mechanisms §2.7)", "norm:layernorm", bonus=0.2)
            add(f, f"re-initialise the {len(lins)} weight layers with He init (biases zero) if "
                "the units start in the tail", lins, "pre-activations of unit scale at the start "
                "(He 2015, mechanisms §2.2)", "init:he")
        elif k == "dead_units":
            names = [n for v in relu_acts.values() for n in v]
            widths = f.evidence.get("widths") or []
            narrow = bool(widths) and min(widths) < 10
            # narrow layers (born dead by width, Lu 2019): ELU first; wide ones: it trails
            # (ELU + He on a 30-layer ReLU/Xavier MLP: 0.61-0.75 accuracy, He init 0.89;
            # python bench/doctor_repair.py --seeds 3 --steps 400 with ELU first everywhere)
            add(f, f"replace nn.ReLU with nn.ELU in {len(names)} layers and re-initialise the "
                "weight layers with He init", names,
                "ELU units never die and push mean activations toward zero (Clevert 2016); on "
                "the zoo's born-dead width-2 depth-10 net ELU + He reaches MSE 0.0016 / 0.0019 "
                "(seeds 0 / 1) where LeakyReLU(0.1) + He ended at 0.095 (mechanisms §2.5)",
                "act:elu+init:he",
                bonus=(1.2 if f.evidence.get("fully_dead") else 0.6) if narrow else 0.0)
            add(f, f"replace nn.ReLU with nn.LeakyReLU(0.1) in {len(names)} layers", names,
                "leaky units keep a gradient when inactive; born-dead collapse (91% of width-2 "
                "depth-10 He inits) disappears (Lu 2019, mechanisms §2.5)", "act:leaky",
                bonus=1.0 if f.evidence.get("fully_dead") else 0.5)
            if narrow:
                depth = max(1, len(lins))
                need = max(10, math.ceil(math.log2(depth / 0.01)))
                add(f, f"widen the narrow layers (width {min(widths)}) to ≥{need} units", f.locations,
                    "each width-N ReLU layer is born dead with probability ~2^-N: depth 10 width 10 "
                    "→ 0.13% born dead vs 91% at width 2 (Lu 2019, mechanisms §2.5 [C])", "")
            if relu_acts and not _has_norm(model):
                add(f, "insert nn.BatchNorm1d after each hidden Linear layer", lins[:-1],
                    "re-centres pre-activations so units cannot stay negative (mechanisms §2.7)",
                    "norm:batchnorm", bonus=0.1)
            if f.evidence.get("fully_dead") is not None and lr:
                add(f, f"lower the learning rate (now {lr:.3g}) or add warmup if units die during "
                    "training", [], "large early steps kill ReLU units (mechanisms §2.5, Z4 variant)",
                    f"lr:{(sug or lr / 10):.6g}" if sug and sug < lr else "")
        elif k == "lr_too_high" and f.evidence.get("regime") == "not_quadratic" and lr:
            # past the point where a quadratic top direction diverges, yet the trial steps
            # improve: the curvature limit is not this run's (doctor._doctor.RELU_CATAPULT_FACTOR)
            warm = ctx.get("warmup_steps")
            add(f, f"keep the learning rate {lr:.3g} (its trial steps reduce the loss)"
                + (f" with {warm} steps of linear warmup" if warm else "")
                + (f"; if the loss spikes early, lower it toward {sug:.3g}" if sug and sug < lr else ""),
                [], "the trial steps at this LR reduce the loss, so its sharpest direction does not "
                "blow up as a quadratic one would (one through a softmax's logits has a bounded "
                "loss: the Lightning demo Transformer's lies in its first attention projection); a "
                "warmup lets the sharpness fall first (Gilmer 2022, mechanisms §3.4-3.5)", "")
        elif k == "lr_too_high" and f.evidence.get("regime") == "preconditioned" and lr:
            # above an adaptive optimizer's preconditioned limit, trial steps calm (an info)
            warm = ctx.get("warmup_steps")
            # (the suggestion is at most half that limit, so below the LR)
            add(f, f"if the loss stalls or spikes, lower the learning rate toward {sug:.3g} "
                f"(now {lr:.3g})"
                + (f"; a {warm}-step linear warmup lets the preconditioner settle first"
                   if warm else ""), [],
                "an adaptive optimizer's preconditioned sharpness settles at (2+2β1)/((1-β1)η) "
                "while it trains (Cohen 2022, mechanisms §3.1), so the limit measured early does "
                "not bind; far above it a run can stall: nanoGPT at 100x its LR stalled at a loss "
                "of 3.2 where its own LR reaches 2.2 (the Guard's plateau note)", "")
        elif k == "lr_too_high" and f.evidence.get("trigger") == "trial_blowup" and sug and lr \
                and sug < lr:
            # the trial steps blew up and came back (doctor._doctor.CALM_TRIES)
            warm = ctx.get("warmup_steps")
            calm = f.evidence.get("calm_lr")
            add(f, f"set the learning rate to {sug:.3g} (now {lr:.3g})"
                + (f" with {warm} steps of linear warmup" if warm else ""), [],
                "the trial steps at this LR blew up before the loss came back"
                + (f"; at {calm:.3g} they did not" if calm is not None and math.isfinite(calm)
                   else "")
                + "; a blow-up in the first updates can leave a model stuck (a diffusion "
                "denoiser that collapses to predicting zero noise), and the preconditioned "
                "curvature limit, measured after them, does not show it",
                f"lr:{sug:.6g}", bonus=0.5)
        elif k in ("lr_too_high", "divergence", "nonfinite"):
            if sug and (lr is None or sug < lr):
                warm = ctx.get("warmup_steps")
                add(f, f"set the learning rate to {sug:.3g} (now {lr:.3g})"
                    + (f" with {warm} steps of linear warmup" if warm else ""), [],
                    _why_lower(f, ctx), f"lr:{sug:.6g}", bonus=0.5)
            clip = ctx.get("clip_norm")
            if clip:
                at = ctx.get("clip_lr")
                src = (f"the gradient norm after the trial steps at lr {at:.3g}, which stayed calm"
                       if at else "average norm of the trial steps")
                add(f, f"clip the gradient norm at {clip:.3g} ({src})", [],
                    "Pascanu 2013: threshold near the average norm (mechanisms §2.4)", "")
        elif k == "lr_too_low" and sug:
            add(f, f"raise the learning rate to {sug:.3g} (now {lr:.3g})", [],
                "the range test's loss keeps falling well above the current LR (Smith 2017, §3.6)",
                f"lr:{sug:.6g}")
        elif k == "batch_too_small":
            ns = ctx.get("noise")
            if ns is not None:
                target = int(2 ** math.ceil(math.log2(max(2.0, ns.b_simple))))
                add(f, f"raise the batch size from {ns.batch} toward B_crit≈{ns.b_simple:.0f} (e.g. "
                    f"{target}, or accumulate gradients), or lower the LR to ε_opt≈{ns.eps_opt:.3g}",
                    [], "ε_opt(B)=ε_max/(1+B_noise/B): below B_noise the step is noise-dominated "
                    "(McCandlish 2018, mechanisms §4.1)", f"lr:{ns.eps_opt:.6g}")
        elif k == "adam_epsilon":
            add(f, "lower Adam's eps to 1e-15 (or use Adam-atan2)", [],
                "ε dominates √v̂ and shrinks the updates (Wortsman 2023, Everett 2024; mechanisms "
                "§5, mechanism 10)", "opt:eps")
        elif k == "precision_overflow":
            add(f, "train in bf16 instead of fp16, or keep these layers in fp32 under autocast "
                "(run them under torch.autocast(enabled=False))", f.locations,
                "bf16 has fp32's range (max 3.39e38 vs 65504; mechanisms §6.1)", "")
        elif k == "precision_underflow":
            add(f, "use loss scaling in fp16 (torch.amp.GradScaler, init scale 2^16)", [],
                "SSD diverged without scaling, ×8 sufficed (Micikevicius 2018, mechanisms §6.2)", "")
        elif k == "precision_sensitive":
            add(f, "keep these layers in fp32 under low-precision autocast", f.locations,
                "their own rounding error exceeds 10·√K·u (mechanisms §6.6)", "")
        elif k == "precision_swamping":
            add(f, "keep fp32 master weights (autocast does), or use Kahan summation / stochastic "
                "rounding for pure bf16 weights", [],
                "within −0.1/+0.2 pts of fp32, up to +7 pts over plain bf16 (Zamirai 2020, §6.4)", "")
    out.sort(key=lambda t: -t[0])
    res = []
    for i, (_, p) in enumerate(out, 1):
        p.rank = i
        res.append(p)
    return res


def _cls(kind: str) -> str:
    return {"sigmoid": "Sigmoid", "tanh": "Tanh", "hardtanh": "Hardtanh",
            "hardsigmoid": "Hardsigmoid"}.get(kind, kind)


def _why_lower(f: Finding, ctx: dict[str, Any]) -> str:
    """Why the suggested LR is lower: the calm trial an adaptive optimizer's diverged trial was
    retried at (its evidence ``tried``: each LR with its peak over its first loss), or the
    curvature limit and the range test."""
    tried = f.evidence.get("tried")
    if tried:
        if f.evidence.get("calm_lr") is None:
            return ("the trial steps diverged at every lower LR tried too, down to "
                    f"{tried[-1][0]:.3g}: look for a structural cause")
        return (f"the trial steps at {tried[-1][0]:.3g} peak at {tried[-1][1]:.1f}x their first "
                "loss (an adaptive optimizer's curvature limit is measured after the trial steps, "
                "here on the weights they wrecked)")
    return (f"below the curvature limit {ctx.get('max_stable_lr', math.nan):.3g} for "
            f"{ctx.get('optimizer')} (η·λ_max < 2 for GD, 38/η for Adam; Cohen 2021/2022, "
            "mechanisms §3.1) and below the range test's divergence point (Smith 2017, §3.6)")
