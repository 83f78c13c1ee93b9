"""Spikes: sudden jumps of the loss or of the gradient norm against their recent history.

Both rules work on the logarithm, because small-batch losses and gradient norms are
multiplicatively noisy: near convergence a classifier's batch loss moves between 1e-4 and 0.5
(600x its median) on perfectly healthy runs, which defeats any linear or median/MAD rule.

Loss spike, after ``min_history`` = 20 steps, when all three hold:
  * ``log(loss)`` is more than ``z`` = 4 standard deviations above the mean of the last
    ``window`` = 64 log-losses (OLMo 2's spike score uses 7 sigma on the raw value over 1000
    steps, arXiv 2501.00656; research/mechanisms.md §7 recommends 50-200 steps for short runs);
  * ``loss > ratio * median`` with ratio = 2, the factor Lightning's SpikeDetection and
    llm-foundry's kill-loss-spike callback use;
  * ``loss - median > floor * L0``, floor = 0.1 of the loss scale ``L0`` at the start of
    training (median of the first 20 losses): a jump must matter at the scale of the task;
  * the spike is sudden, ``loss > jump * previous loss`` with jump = 2.5 (a bad batch, a
    cliff), or, when it built up over several steps, it reached ``gradual`` = 10x the window
    median. A gradual rise is curvature-driven: at the edge of stability full-batch GD's loss
    rose at most 1.96x per step and peaked at 3.6x its median (0.020 -> 0.077 over five
    steps, then self-stabilised; zoo control ``curvature_edge_of_stability``, seeds 0-1,
    Cohen 2021), whereas Adam's stale-second-moment spikes rise ~2x per step to 20-50x the
    converged loss (zoo ``adam_stale_second_moment``; Bai et al. 2025). An order of magnitude
    separates the two with room on both sides.
  Losses with a negative value in the window fall back to ``z`` = 7 on the raw values (OLMo 2),
  with a jump of at least half the loss's scale (``LossSpikeDetector.raw_floor``). A value of
  exactly 0 among values that are never negative (a loss or a norm that underflowed: a
  cross-entropy reads 0 once the true class's log-probability rounds to 0 in float32) is left
  out of the log-space statistics instead, and is never a spike itself. A digits MLP at batch 1
  under momentum SGD reads 0 on 6-8% of its steps once converged (``python
  bench/small_batch.py``'s runs, a scratch count), and while the rule fell back to the raw
  values for them, whose mean and spread a heavy tail defeats, hard examples (losses 2-6 over a
  median of 1e-3) were skipped as spikes at raw z 9-22 and answered with rollbacks (a scratch
  run). ``python bench/calibrate_detectors.py --batches 1,2 --steps 10000 --seeds 3``: 99
  loss-spike findings in 6 of 18 healthy runs before, 0 after.
  In the first ``min_history`` steps one rule judges: the loss is more than ``early_ratio`` =
  1e6 times the largest loss so far (see ``LossSpikeDetector.early_ratio`` for the numbers).
  After a rollback (the history restarts) the start's scale counts among the losses so far:
  at batch 1 the first loss after a rollback can be a confident example's 1e-7, and a hard
  one next was "1e6x the largest so far".

Gradient explosion, after ``min_history`` = 20 steps, when all four hold:
  * ``log(norm)`` is more than ``z`` = 4 standard deviations above the window's mean;
  * ``norm > ratio * median`` with ratio = 10: Pascanu et al. 2013 report clipping
    thresholds from half to ten times the average norm still converge, so beyond ten times
    the norm is outside ordinary noise;
  * ``norm`` exceeds the gradient scale at the start of training (median of the first 20
    norms), so a memorised run's tiny gradients waking up is not called an explosion;
  * ``norm > jump * previous norm`` with jump = 3: explosions are sudden (Pascanu's "cliffs";
    a bad batch; GD past the curvature limit grows the norm ~7x per step at eta = 8/lambda;
    the zoo's exploding RNN jumps 6-11x), whereas edge-of-stability growth in full-batch GD
    is gradual and must stay silent (measured: at most 1.3x per step on the demo model, and
    at most 2.2x per step at the onset of the zoo's ``curvature_edge_of_stability`` control,
    where the norm rose 40x over six steps and then self-stabilised; Cohen 2021).
  In the first ``min_history`` steps (no statistics yet) two rules judge: the norm is more
  than ``early_ratio`` = 100 times the largest norm seen so far, or it ran away: above
  ``early_growth`` = 100 times the smallest norm so far after growing more than ``jump`` = 3x
  on each of the last two steps (see ``GradExplosionDetector.early_growth``). After a rollback
  (the history restarts) the start's gradient scale counts among the norms so far, and a
  runaway must rise above it, as the main rule's floor asks: a converged digits MLP at batch 1
  (momentum SGD) restarted at a confident example's norm of 6e-7, and the next ten norms (4e-4
  to 0.6, against 2.8 at the start) were taken for explosions, an LR cut each, until the run
  halted (a scratch run of bench/small_batch.py's kind). A ReLU RNN with identity
  recurrent weights (IRNN, Le et al. 2015) at SGD lr 0.01 goes from 92 at step 0 to 1.2e7 at
  step 1 (1.3e5x, zoo ``lr_relu_rnn_early_explosion``); clipping that step to twice the
  earlier median rescues the run, a rollback + LR backoff 25 steps later costs the run its
  start. Healthy streams' early norms never rise 100x in one step (the edge-of-stability
  onset: 2.2x per step; bench/calibrate_detectors.py). GD past the curvature limit (zoo
  ``curvature_gd_past_limit``, seed 0) trips the runaway rule at step 2 (a clip) and crosses
  the 100x bar at step 4, the step the divergence rule fires: its rollback + LR backoff takes
  precedence over the clip (a rolled-back step is skipped).
  The finding names the module whose norm grew most against its own running average.

Calibration: ``python bench/calibrate_detectors.py`` replays 10 healthy runs (digits MLP,
batch 4-32, SGD / momentum / Adam, 1500 steps each) through both rules: 0 false alarms.
An alarming value enters the history capped at the threshold (as ZClip updates its EMA with
the clipped value), so a lasting level shift is absorbed instead of alarming forever.
"""
from __future__ import annotations

import math
from typing import Any, Sequence
from collections import deque

import numpy as np

from ..types import Finding, StepStats
from .base import ChanceAware, Detector, check_positive


class _LogJump(Detector):
    """Shared rule: log-space z-score + ratio to the median + floor against the initial scale."""

    _state: tuple[str, ...] = ("history", "initial", "_first")

    def __init__(self, window: int, z: float, ratio: float, min_history: int) -> None:
        check_positive("window", window, integer=True)
        check_positive("z", z)
        check_positive("ratio", ratio)
        check_positive("min_history", min_history, integer=True)
        self.window, self.z, self.ratio, self.min_history = window, z, ratio, min_history
        self.history: deque[float] = deque(maxlen=window)  # raw values
        self.initial: float | None = None
        self._first: list[float] = []
        #: running [sum of logs, sum of squared logs, negative count, count, zero count] of
        #: the window (the logs are of its positive values: see :meth:`_log_moments`)
        self._sums: list[Any] | None = None
        self._steps = 0

    def reset(self) -> None:
        self.history.clear()
        self._sums = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums = None  # the running sums describe the window being replaced
        super().load_state_dict(state)

    def _track_initial(self, v: float) -> None:
        if self.initial is None:
            self._first.append(v)
            if len(self._first) >= self.min_history:
                self.initial = float(np.median(self._first))
                self._first = []

    def _log_moments(self) -> tuple[float, float] | None:
        """Mean and std of the logs of the history's positive values, from running sums
        (O(1) per step); None if some value is negative or none is positive. A value of
        exactly 0 is left out (an underflow; the module's docstring). Sums are rebuilt when
        the window changed under them."""
        sums = self._sums
        if sums is None or sums[3] != len(self.history):
            a = np.fromiter(self.history, dtype=float)
            if a.min() < 0:
                self._sums = None
                return None
            la = np.log(a[a > 0])
            sums = [float(la.sum()), float((la * la).sum()), 0, len(a), int((a == 0).sum())]
            self._sums = sums
        n = sums[3] - sums[4]
        if sums[2] or n <= 0:
            return None
        mu = sums[0] / n
        return mu, math.sqrt(max(sums[1] / n - mu * mu, 0.0))

    def _push(self, v: float, lv: float | None = None) -> None:
        """Append ``v`` (``lv``: its log when the caller has it) and update the sums."""
        sums = self._sums
        h = self.history
        if sums is not None:
            if len(h) == h.maxlen:
                old = h[0]
                if old > 0:
                    lo = math.log(old)
                    sums[0] -= lo
                    sums[1] -= lo * lo
                elif old == 0:
                    sums[4] -= 1
                else:
                    sums[2] -= 1
                sums[3] -= 1
            if v > 0:
                if lv is None:
                    lv = math.log(v)
                sums[0] += lv
                sums[1] += lv * lv
            elif v == 0:
                sums[4] += 1
            else:
                sums[2] += 1
            sums[3] += 1
        h.append(v)
        self._steps += 1
        if self._steps % 1000 == 0:
            self._sums = None  # rebuild now and then against floating-point drift

    def _judge(self, v: float) -> tuple[bool, dict]:
        """Is ``v`` a jump? Returns (verdict, evidence); updates the history."""
        if self.initial is None:
            self._track_initial(v)
        if len(self.history) < self.min_history:
            early = self._early(v)
            if early:
                med = float(np.median(np.fromiter(self.history, dtype=float)))
                n = len(self.history)
                self._push(max(self.history))  # the history keeps the pre-explosion scale
                return True, {"median": med, "z": math.inf, "window": n,
                              "initial": self.initial, "trigger": "early"}
            self._push(v)
            return False, {}
        mom = self._log_moments() if v >= 0 else None
        if mom is not None and v == 0:  # an underflow among values never negative: no jump
            self._push(v)
            return False, {}
        if mom is not None:
            mu, sd = mom
            lv = math.log(v)
            z = (lv - mu) / sd if sd > 0 else (math.inf if lv > mu else 0.0)
            if z <= self.z:  # the common case: no median needed
                self._push(v, lv)
                return False, {}
            med = float(np.median(np.fromiter(self.history, dtype=float)))
            cap = math.exp(min(mu + self.z * sd, 700.0))
            jump = v > self.ratio * med and self._floor_ok(v, med)
        else:
            a = np.fromiter(self.history, dtype=float)
            med = float(np.median(a))
            mu, sd = float(a.mean()), float(a.std())
            z = (v - mu) / sd if sd > 0 else (math.inf if v > mu else 0.0)
            cap = mu + 7.0 * sd
            jump = z > 7.0 and self._raw_ok(v, med, a)
        n = len(self.history)
        self._push(min(v, cap) if jump else v)
        ev = {"median": med, "z": z, "window": n, "initial": self.initial}
        if mom is None:
            ev["raw"] = True  # z of the raw values: some value is not positive
        return jump, ev

    def _largest_so_far(self) -> float:
        """The history's largest value, or the start's scale when that is larger: after a
        rollback the history restarts from the restored weights' first value, which at batch 1
        can be a confident example's (a loss of 1e-7, a norm of 6e-7)."""
        return max(max(self.history), self.initial or 0.0)

    def _floor_ok(self, v: float, med: float) -> bool:
        return True

    def _raw_ok(self, v: float, med: float, window: np.ndarray) -> bool:
        """The raw-value rule's second condition (values that are not all positive)."""
        return True

    def _early(self, v: float) -> bool:
        """A jump judged before ``min_history`` values exist (off by default)."""
        return False


class LossSpikeDetector(ChanceAware, _LogJump):
    kind = "loss_spike"
    #: ``calm_step``: the last step whose loss was judged and was no spike; a finding quotes it
    #: as ``evidence["healthy_step"]``, so that a rollback restores weights that gave a calm
    #: loss (the snapshot of the first spiking step holds the weights that spiked), and the
    #: decision core can tell a loss that moved at those weights (the data or the loss
    #: changed) from weights that went bad (:meth:`DecisionCore.rolled_back`)
    _state = _LogJump._state + ("calm_step",)

    def __init__(self, window: int = 64, z: float = 4.0, ratio: float = 2.0,
                 floor: float = 0.1, min_history: int = 20, jump: float = 2.5,
                 gradual: float = 10.0, early_ratio: float = 1e6) -> None:
        super().__init__(window, z, ratio, min_history)
        check_positive("floor", floor)
        check_positive("jump", jump)
        check_positive("gradual", gradual)
        check_positive("early_ratio", early_ratio)
        self.floor = floor
        self.jump = jump
        self.gradual = gradual
        #: the uninformed-guess level of a cross-entropy (ln V), when the decision core knows
        #: it: a run that starts from a trained model (its first losses below half of it)
        #: takes it as the loss scale of the floor rule, since its own start is already near
        #: the floor: a resumed digits classifier (first losses ~0.007) skipped healthy
        #: batches at 0.05-0.1, 15-40x a 0.003 median (bench/calibrate_detectors.py --resumed)
        self.chance: float | None = None
        #: In the first ``min_history`` steps (no statistics yet) a loss more than this many
        #: times the largest loss so far is a spike. 1e6 is far above any healthy start (the
        #: catapult phase of a large learning rate raises the loss at most ~7x, zoo control
        #: ``healthy_gpt_no_warmup``) and above the early ruins other detectors own: an LR too
        #: high, 10-20x over several steps (lr_* scenarios, divergence), and the IRNN's
        #: explosion at step 1, 1.6e5x (``lr_relu_rnn_early_explosion``, grad_explosion clips
        #: it; at 1e4 this rule took the step first and skipped it instead). The fault campaign
        #: (bench/faults.py) injects a logit bit flip whose loss is 1.9e36 after a healthy 1.4:
        #: without this rule it went unreported until step 20.
        self.early_ratio = early_ratio
        self.calm_step: int | None = None

    def _early(self, v: float) -> bool:
        h = self.history
        if not h or not math.isfinite(v):
            return False
        top = self._largest_so_far()
        return top > 0 and v > self.early_ratio * top

    def _floor_ok(self, v: float, med: float) -> bool:
        prev = self.history[-1] if self.history else None
        sudden = prev is None or prev <= 0 or v > self.jump * prev or v > self.gradual * med
        if not sudden or self.initial is None:
            return sudden
        scale = abs(self.initial)
        if self.chance is not None and scale < 0.5 * self.chance:
            scale = self.chance  # a trained start: the task's scale is the uninformed guess
        return v - med > self.floor * scale

    #: Losses that are not all positive (a Gaussian NLL, an entropy bonus, a Wasserstein
    #: critic) have no zero to take a ratio against: besides z > 7 on the raw values, the
    #: jump must be at least ``raw_floor`` = 0.5 of the loss's scale, the larger of its
    #: starting level's size and the distance it has come down from it (the window's lowest
    #: loss). Measured: a digits MLP whose loss carries an entropy bonus (-1.05 at
    #: convergence, from ~0 at the start) jumps by 0.07-0.10 from one batch to the next with
    #: z = 7.3-7.9 (three skips in 2,000 steps without this condition), while a batch of
    #: wrong labels or outliers lifts a cross-entropy by nats and a Gaussian NLL by tens.
    raw_floor = 0.5

    def _raw_ok(self, v: float, med: float, window: np.ndarray) -> bool:
        init = self.initial if self.initial is not None else med
        scale = max(abs(init), init - float(window.min()))
        return v - med > self.raw_floor * scale

    def update(self, s: StepStats) -> list[Finding]:
        if not s.loss_usable or s.scaler_overflow:
            return []
        jump, ev = self._judge(s.loss)
        if not jump:
            self.calm_step = s.step
            return []
        if self.calm_step is not None and self.calm_step < s.step:
            ev["healthy_step"] = self.calm_step
        med = ev["median"]
        times = f"{s.loss / med:.1f}x " if med > 0 else ""
        return [Finding(
            kind="loss_spike", step=s.step, severity="warning",
            message=(f"loss jumped to {s.loss:.4g}, {times}the recent median {med:.4g} "
                     + (f"(z = {ev['z']:.1f} on the raw values, which are not all positive)"
                        if ev.get("raw") else f"(log-space z = {ev['z']:.1f})")),
            evidence={"loss": s.loss, **ev},
        )]


class GradExplosionDetector(_LogJump):
    kind = "grad_explosion"
    _state = _LogJump._state + ("module_log_ema",)

    def __init__(self, window: int = 64, z: float = 4.0, ratio: float = 10.0,
                 min_history: int = 20, ema: float = 0.9, jump: float = 3.0,
                 early_ratio: float = 100.0) -> None:
        super().__init__(window, z, ratio, min_history)
        check_positive("jump", jump)
        check_positive("early_ratio", early_ratio)
        self.jump = jump
        self.early_ratio = early_ratio
        if not 0 < ema < 1:
            raise ValueError(f"ema must be in (0, 1), got {ema!r}")
        self.ema = ema
        self.module_log_ema: np.ndarray | None = None
        #: per-module norms not yet folded into ``module_log_ema`` (folded in order, with the
        #: same arithmetic, when a finding needs the average, at ``state_dict`` or every
        #: ``_FOLD`` steps: the average is read only when a jump is reported)
        self._pending: list[Sequence[float]] = []

    _FOLD = 64
    #: up to this many modules the folding runs in Python floats, above it row by row in numpy
    #: (a numpy call costs about as much as ~30 Python multiply-adds)
    _FOLD_PLAIN = 32

    def reset(self) -> None:
        super().reset()
        self.module_log_ema = None
        self._pending = []

    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return super().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = []
        super().load_state_dict(state)

    def _floor_ok(self, v: float, med: float) -> bool:
        prev = self.history[-1] if self.history else None
        sudden = prev is None or v > self.jump * prev
        return sudden and (self.initial is None or v > self.initial)

    #: the early "runaway" rule: before ``min_history`` norms exist, a norm above
    #: ``early_growth`` x the smallest one so far that grew more than ``jump`` x on each of the
    #: last two steps. The zoo's exploding tanh RNN (Pascanu 2013, rho = 1.5) starts large
    #: (104) and runs away 8.5 -> 97 -> 193 -> 1,329 -> 14,958 by step 5 (seed 0), where
    #: ``early_ratio`` (100x the largest so far) never fires and only the loss-ruin rule named
    #: it (``divergence``). Healthy streams' early norms do fall 10x and rise again, but never
    #: 3x twice in a row to 100x their minimum (bench/calibrate_detectors.py: 0 alarms; the
    #: zoo's healthy runs: 0).
    early_growth = 100.0

    def _early(self, v: float) -> bool:
        h = self.history
        if not h or not math.isfinite(v):
            return False
        top = self._largest_so_far()
        if top <= 0:
            return False
        if v > self.early_ratio * top:
            return True
        lo = min(h)
        return (len(h) >= 2 and lo > 0 and v > self.early_growth * lo
                and v > self.jump * h[-1] and h[-1] > self.jump * h[-2]
                and (self.initial is None or v > self.initial))

    def _worst_module(self, s: StepStats) -> tuple[str, float]:
        self._fold()
        if not s.modules or self.module_log_ema is None:
            return "", math.nan
        g = np.asarray(s.grad_norms, dtype=float)
        if g.shape != self.module_log_ema.shape:
            return "", math.nan
        growth = np.log(np.maximum(g, 1e-45)) - self.module_log_ema
        growth[~np.isfinite(growth)] = -np.inf
        i = int(np.argmax(growth))
        return s.modules[i], float(np.exp(growth[i]))

    def _track_modules(self, s: StepStats) -> None:
        if not s.modules:
            return
        self._pending.append(s.grad_norms)
        if len(self._pending) >= self._FOLD:
            self._fold()

    def _fold(self) -> None:
        pending, self._pending = self._pending, []
        i = 0
        while i < len(pending):
            # a run of records with the same modules takes one log for the whole block (an
            # elementwise ufunc: the same values as row by row); the average then goes on
            # row by row with the same arithmetic as before
            j, n = i + 1, len(pending[i])
            while j < len(pending) and len(pending[j]) == n:
                j += 1
            block = np.log(np.maximum(np.asarray(pending[i:j], dtype=float), 1e-45))
            i = j
            ema = self.module_log_ema
            a, b = self.ema, 1 - self.ema
            if n <= self._FOLD_PLAIN:
                # narrow rows in Python floats: the same IEEE products and sums as numpy's
                # elementwise ``a * ema + b * g``, without a numpy call per row per operation
                rows = block.tolist()
                if ema is None or ema.shape != (n,):
                    cur = rows[0]
                    rows = rows[1:]
                else:
                    cur = ema.tolist()
                for r in rows:
                    cur = [a * m + b * x for m, x in zip(cur, r)]
                self.module_log_ema = np.array(cur, dtype=float)
                continue
            for g in block:
                if ema is None or ema.shape != g.shape:
                    ema = g.copy()
                else:
                    ema = a * ema + b * g
            self.module_log_ema = ema

    def update(self, s: StepStats) -> list[Finding]:
        if not s.grads_finite or s.scaler_overflow:
            return []
        norm = s.grad_norm
        jump, ev = self._judge(norm)
        out: list[Finding] = []
        if jump:
            where, growth = self._worst_module(s)
            med = ev["median"]
            ratio = norm / med if med > 0 else math.inf  # a median of zeros: underflows
            times = f"{ratio:.0f}x " if med > 0 else "above "
            out.append(Finding(
                kind="grad_explosion", step=s.step, severity="warning", where=where,
                message=(f"gradient norm {norm:.4g} is {times}its recent median "
                         f"{med:.4g}" + (f"; {where} grew {growth:.0f}x against its own "
                                         "average" if where else "")),
                evidence={"grad_norm": norm, "ratio": ratio, "module_growth": growth, **ev},
            ))
        self._track_modules(s)
        return out
