"""Dead and saturated units, from activation statistics gathered on sampled steps.

Dead (ReLU-family modules whose output is exactly 0 for a unit on every sample of the batch;
smooth ReLU-likes, ELU, SELU, CELU, SiLU, GELU, Mish, whose output lies in their flat
negative tail, where the slope is under 1% of the linear part's, on every sample, see
``trainguard.stats.DEAD_TAILS``; the rise rule's level for them is ``smooth_level`` = 0.9,
since their tail still passes a little gradient, which Adam rescales, and a layer can come back
from 87% in it):
  * any layer with ``dead_fraction >= full`` = 0.99: a fully dead layer passes no gradient,
    the unambiguous signal of research/mechanisms.md §2.5 (Lu et al. 2019: >90% of width-2
    depth-10 ReLU nets are born dead);
  * or the dead fraction rose by ``rise`` >= 0.4 since the first probe and is now >= 0.6:
    units killed during training. Healthy deep He-init nets already show ~30% inactive units
    at depth 30-50 (mechanisms.md §2.5, [C]), so an absolute threshold below that would cry
    wolf; the rise is what separates dying from normal sparsity. The rise rule needs each unit
    seen on at least ``min_rows`` = 32 rows (samples x positions): on fewer, units that grew
    selective read as dead (see ``DeadUnitsDetector.min_rows``).
  ``evidence["cause"]`` is ``"born_dead"`` when the layer was already fully dead at its first
  probe (a structural fault: init or width) and ``"killed"`` when it died during training
  (an oversized step: LR too high, a bad batch; Lu et al. 2019 §2.5), with
  ``evidence["healthy_step"]``, the last probe at which every reported layer was still alive,
  so that a rollback can return to weights from before the kill. After a rollback
  (:meth:`reset`) killed layers are watched again.

Saturated (sigmoid: output < 0.01 or > 0.99; tanh: |output| > 0.99, the definitions of
mechanisms.md §2.11): a layer with ``saturated >= 0.75`` of its outputs saturated on
``patience`` = 2 consecutive probes.

Saturated attention (softmax over a query x key tensor, seen on sampled steps): at least
``attention`` = 0.9 of the rows with two or more keys are one-hot (max probability > 0.99) on
``patience`` = 2 probes: attention-logit growth, entropy collapsed to ~0 (Dehghani et al.
2023, ViT-22B; Wortsman et al. 2023 reproduce it in small models at high LR; Zhai et al.
2023). Trained heads can be sharp, so the bar is nearly all rows, not a majority. Glorot & Bengio 2010 saw the top sigmoid layer driven to
saturation early in training; healthy tanh nets sit well below (6.6% even in the chaotic
phase at init, mechanisms.md §2.10).
"""
from __future__ import annotations

from ..types import Finding, StepStats
from .base import Detector, check_positive

RELU_KINDS = {"relu", "relu6"}
#: smooth ReLU-likes whose flat negative tail passes under 1% of the gradient
#: (``trainguard.stats.DEAD_TAILS``): a unit there on every row is dead as a ReLU's is
SMOOTH_KINDS = {"elu", "selu", "celu", "silu", "gelu", "mish"}
DEAD_KINDS = RELU_KINDS | SMOOTH_KINDS
SATURATING_KINDS = {"sigmoid", "tanh", "hardtanh", "hardsigmoid"}


class DeadUnitsDetector(Detector):
    kind = "dead_units"
    sampled = "activations"
    _state = ("first_seen", "reported", "alive_at", "killed")

    def __init__(self, full: float = 0.99, rise: float = 0.4, level: float = 0.6,
                 min_rows: int = 32, smooth_level: float = 0.9) -> None:
        for name, v in (("full", full), ("rise", rise), ("level", level),
                        ("smooth_level", smooth_level)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        check_positive("min_rows", min_rows, integer=True)
        self.full, self.rise, self.level = full, rise, level
        #: the rise rule's level for the smooth ReLU-likes (SMOOTH_KINDS): their flat tail
        #: still passes up to 1% of the gradient, which Adam rescales, so a layer can come back
        #: from it. Measured on DDPM denoisers (SiLU MLPs, ``python bench/diffusion_trial.py``
        #: and its module docstring): layers that came back with the loss unharmed peaked at
        #: 71% and 87% in the tail (two swiss-roll runs at Adam 1e-2, back under 40% within
        #: 100-400 steps), while every run whose loss sat at 1.0, the net predicting zero
        #: noise, had its last layer at 92-100% at the first probe after the kill (digits at
        #: Adam 3e-2, swiss roll at 1e-2). The ReLU ``level`` of 0.6 rolled the two healthy
        #: runs back.
        self.smooth_level = smooth_level
        #: the rise rule (units killed, not a whole layer) needs the units seen on at least
        #: ``min_rows`` = 32 rows (samples x positions; the probe reports them as ``rows``):
        #: a unit is counted dead when it is silent on every row of the batch, and units grow
        #: selective as they train, so on few rows a living layer reads as dying. Measured on a
        #: digits MLP (64-128-10, SGD momentum 0.9, batch 4, label smoothing 0.1; 19% of its
        #: units silent on the whole training set at step 2,000, 99.4% accuracy): the layer
        #: reads 63% dead on 4 rows, 51% on 8, 44% on 16 and 40% on 32, against 26/18/14/10% at
        #: initialisation; the Guard halted that run at step 1,340 after 8 rollbacks
        #: (tests/test_small_batch.py trains it). The margin at 32 rows
        #: is thin: without label smoothing (30% truly silent, from 2%; 95.9% accuracy) the
        #: layer reads 58% on 32 rows, against the 60% ``level`` (python bench/dead_rows.py
        #: prints these readings). A whole layer dead (``full``) is judged on any number of
        #: rows: the zoo's data_small_batch kills its layer at batch 2.
        self.min_rows = int(min_rows)
        self.first_seen: dict[str, float] = {}
        self.reported: list[str] = []
        self.alive_at: dict[str, int] = {}  # layer -> last probe step where it was not flagged
        self.killed: list[str] = []

    def reset(self) -> None:
        # a rollback restored weights from before the kill: watch those layers again
        self.reported = [n for n in self.reported if n not in self.killed]
        self.killed = []

    def update(self, s: StepStats) -> list[Finding]:
        if not s.activations:
            return []
        dead_layers = []
        for name, a in s.activations.items():
            if a.get("kind") not in DEAD_KINDS or a.get("dead_fraction") is None:
                continue
            frac = float(a["dead_fraction"])
            first = self.first_seen.setdefault(name, frac)
            rows = a.get("rows")
            few = isinstance(rows, int) and rows < self.min_rows
            bar = self.smooth_level if a.get("kind") in SMOOTH_KINDS else self.level
            if frac >= self.full or (not few and frac - first >= self.rise and frac >= bar):
                dead_layers.append((name, frac, first, a.get("units", 0), a.get("kind")))
            elif a.get("kind") not in SMOOTH_KINDS or frac < self.level:
                # a smooth layer between ``level`` and its own bar is not reported, and not the
                # healthy state a rollback returns to either (a layer 84% in its tail, restored,
                # went on dying: rollbacks to it cut the LR to 0.08x with the loss still at 1)
                self.alive_at[name] = s.step
        new = [d for d in dead_layers if d[0] not in self.reported]
        if not new:
            return []
        self.reported.extend(d[0] for d in new)
        name, frac, first, units, kind = new[0]
        born = frac >= self.full and first >= self.full
        ev: dict = {"layers": {d[0]: {"dead_fraction": d[1], "first": d[2], "units": d[3]}
                               for d in new},
                    "cause": "born_dead" if born else "killed"}
        if born:
            how = "born dead: no unit fired since the first probe"
        else:
            alive = [self.alive_at[d[0]] for d in new if d[0] in self.alive_at]
            ev["healthy_step"] = min(alive) if alive else None
            self.killed.extend(d[0] for d in new)
            how = (f"was {first:.0%} dead at the first probe"
                   + (f", alive at step {ev['healthy_step']}" if alive else "")
                   + ": killed during training")
        if kind in SMOOTH_KINDS:
            ev["activation"] = kind
            return [Finding(
                kind="dead_units", step=s.step, where=name,
                locations=tuple(d[0] for d in new),
                message=(f"{frac:.0%} of the {units} units of {name} ({kind}) sit in its flat "
                         f"negative tail on every sample ({how}); under 1% of the gradient flows "
                         "through them"),
                evidence=ev,
                remedies=("lower the learning rate or add warmup",
                          "add normalisation (LayerNorm/BatchNorm) before the activation",
                          "check the init; keep the pre-activations near unit scale"),
            )]
        return [Finding(
            kind="dead_units", step=s.step, where=name,
            locations=tuple(d[0] for d in new),
            message=(f"{frac:.0%} of the {units} units of {name} output 0 on every sample "
                     f"({how}); no gradient flows through them"),
            evidence=ev,
        )]


class SaturationDetector(Detector):
    kind = "saturation"
    sampled = "activations"
    _state = ("streaks", "reported")

    def __init__(self, saturated: float = 0.75, patience: int = 2, attention: float = 0.9) -> None:
        for name, v in (("saturated", saturated), ("attention", attention)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        check_positive("patience", patience, integer=True)
        self.saturated, self.patience, self.attention = saturated, patience, attention
        self.streaks: dict[str, int] = {}
        self.reported: list[str] = []

    def update(self, s: StepStats) -> list[Finding]:
        if not s.activations:
            return []
        hits = []
        for name, a in s.activations.items():
            kind = a.get("kind")
            if (kind not in SATURATING_KINDS and kind != "softmax") or a.get("saturated_fraction") is None:
                continue
            frac = float(a["saturated_fraction"])
            bar = self.attention if kind == "softmax" else self.saturated
            self.streaks[name] = self.streaks.get(name, 0) + 1 if frac >= bar else 0
            if self.streaks[name] >= self.patience and name not in self.reported:
                hits.append((name, frac, kind, a.get("max_logit")))
        if not hits:
            return []
        self.reported.extend(h[0] for h in hits)
        name, frac, kind, maxlogit = hits[0]
        if kind == "softmax":
            module = name.rsplit(".softmax", 1)[0]
            return [Finding(
                kind="saturation", step=s.step, where=module,
                locations=tuple(h[0].rsplit(".softmax", 1)[0] for h in hits),
                message=(f"{frac:.0%} of the attention rows in {module} are one-hot (max |logit| "
                         f"{maxlogit:.3g}): attention logits have grown until the softmax "
                         "saturated, its gradient vanishes and attention entropy collapsed"),
                evidence={"attention": True, "layers": {h[0]: {"one_hot_fraction": h[1],
                                                               "max_logit": h[3]} for h in hits}},
                remedies=("add qk-layernorm (LayerNorm/RMSNorm on queries and keys; Dehghani 2023)",
                          "lower the learning rate or soft-cap the attention logits (tanh)",
                          "z-loss / weight decay on the attention projections"),
            )]
        return [Finding(
            kind="saturation", step=s.step, where=name, locations=tuple(h[0] for h in hits),
            message=(f"{frac:.0%} of the {kind} outputs of {name} are saturated, where the "
                     "derivative is near 0: gradients through it vanish"),
            evidence={"layers": {h[0]: {"saturated_fraction": h[1], "kind": h[2]} for h in hits
                                 if h[2] != "softmax"}},
        )]
