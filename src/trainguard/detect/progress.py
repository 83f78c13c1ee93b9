"""Progress of the loss: divergence and plateau.

Divergence, either trigger:
  * fast: the loss rose on ``fast_steps`` = 4 consecutive steps by a total factor of at least
    ``fast_factor`` = 1e4. Gradient descent past the curvature limit grows the loss by
    (1 - eta*lambda)^2 per step (49x at eta = 8/lambda, research/mechanisms.md Z7), so it
    crosses 1e4 in three steps; a benign catapult (Lewkowycz 2020, 2/lambda < eta < ~4/lambda)
    rises by at most ~9x per step and turns around well before 1e4 (calibrated on the zoo's
    catapult control: 52x in five steps). The last loss must also exceed the first loss of
    the run: a blow-up that matters loses all progress, whereas near convergence small-batch
    noise alone rises 1e4x in four steps from a ~1e-4 loss (measured: digits MLP, SGD
    momentum 0.9, batch 4: 1e-4 -> 1.38, 1e-5 -> 0.15 and 3e-7 -> 0.025, first loss 2.3;
    bench/calibrate_detectors.py).
  * fast, windowed: within the last ``fast_window`` = 10 steps the loss rose to at least
    ``fast_factor`` times the window's minimum, the step before was already above
    sqrt(``fast_factor``) = 100 times it (a blow-up builds up; one bad batch does not), and
    the last loss exceeds the first loss of the run. This catches a blow-up that is not
    strictly monotone, e.g. the zoo's exploding RNN after a rollback: 0.195 -> 0.578 -> 0.522
    -> 4.47 -> 15 -> 27 -> 36 -> 299 -> 1199 -> 3794 over nine steps (1.9e4x, never 1e4x
    within four consecutive rises).
  * slow: after ``warmup`` = 50 steps, the smoothed loss (EMA, 0.9) stayed above ``factor`` = 4
    times its best for ``patience`` = 10 steps *and* gave back more than half of the progress
    made since the start (a run that never improved on its first loss has no progress to
    give back: 4x its best is then enough). 4x the best is the divergence rule of LR range
    tests (fastai's LR finder, Smith 2017); the half-progress condition keeps a converged
    loss near 0 from calling its noise a divergence.

Plateau (severity "info"): after ``warmup`` steps, the smoothed loss has not improved its best
by ``min_improvement`` = 1% in ``patience_plateau`` = 100 steps while still above half its
initial value: training is stuck, not converged (AUTOTRAINER's slow-convergence rule, ICSE
2021, adapted to the loss; ReduceLROnPlateau's relative-threshold test).
"""
from __future__ import annotations

import math
from collections import deque

from ..types import Finding, StepStats
from .base import Detector, check_positive


class DivergenceDetector(Detector):
    kind = "divergence"
    _state = ("recent", "window", "lastp", "ema", "best", "initial", "above", "seen",
              "reported_at", "first_loss")

    def __init__(self, fast_steps: int = 4, fast_factor: float = 1e4, factor: float = 4.0,
                 patience: int = 10, warmup: int = 50, smoothing: float = 0.9,
                 fast_window: int = 10) -> None:
        check_positive("fast_steps", fast_steps, integer=True)
        check_positive("fast_window", fast_window, integer=True)
        check_positive("fast_factor", fast_factor)
        check_positive("factor", factor)
        check_positive("patience", patience, integer=True)
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.fast_steps, self.fast_factor, self.factor = fast_steps, fast_factor, factor
        self.patience, self.warmup, self.smoothing = patience, warmup, smoothing
        self.fast_window = fast_window
        self.recent: deque[float] = deque(maxlen=fast_steps + 1)
        self.window: deque[float] = deque(maxlen=fast_window)
        self.lastp: deque[float] = deque(maxlen=patience)
        self.ema: float | None = None
        self.best: float | None = None
        self.initial: float | None = None
        self.first_loss: float | None = None
        self.above = 0
        self.seen = 0
        self.reported_at = -1

    def reset(self) -> None:
        # after a rollback the smoothed loss restarts from the restored state's losses
        self.recent.clear()
        self.window.clear()
        self.lastp.clear()
        self.above = 0
        self.ema = None

    def update(self, s: StepStats) -> list[Finding]:
        if not s.loss_finite or s.scaler_overflow:
            return []
        loss = s.loss
        self.recent.append(loss)
        self.window.append(loss)
        self.lastp.append(loss)
        self.seen += 1
        self.ema = loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * loss
        if self.initial is None:
            self.initial = self.ema
        if self.first_loss is None:
            self.first_loss = loss
        out: list[Finding] = []
        r = list(self.recent)
        if (len(r) == self.fast_steps + 1 and all(b > a for a, b in zip(r, r[1:]))
                and r[0] > 0 and r[-1] / r[0] >= self.fast_factor
                and (self.first_loss is None or r[-1] > self.first_loss)):
            out.append(self._finding(s, f"the loss grew {r[-1] / r[0]:.1e}x in {self.fast_steps} "
                                        f"steps ({r[0]:.3g} -> {r[-1]:.3g}): exponential blow-up",
                                     {"losses": r, "trigger": "fast"}))
            self.recent.clear()
            self.window.clear()
            return out
        w = list(self.window)
        if len(w) >= 3:
            i = min(range(len(w) - 2), key=w.__getitem__)  # the low point before the last two
            lo = w[i]
            if (lo > 0 and w[-1] >= self.fast_factor * lo
                    and w[-2] >= math.sqrt(self.fast_factor) * lo
                    and (self.first_loss is None or w[-1] > self.first_loss)):
                out.append(self._finding(
                    s, f"the loss grew {w[-1] / lo:.1e}x in {len(w) - 1 - i} steps ({lo:.3g} -> "
                       f"{w[-1]:.3g}): runaway blow-up",
                    {"losses": w[i:], "trigger": "fast"}))
                self.recent.clear()
                self.window.clear()
                return out
        if self.seen <= self.warmup:
            return out
        self.best = self.ema if self.best is None else min(self.best, self.ema)
        # half the progress since the start given back; a run that never beat its first
        # loss has none to give back, so 4x its best suffices
        lost = (self.ema - self.best) > 0.5 * max(self.initial - self.best, 0.0)
        med = sorted(self.lastp)[len(self.lastp) // 2]
        if self.best > 0 and self.ema > self.factor * self.best and med > self.factor * self.best and lost:
            self.above += 1
        else:
            self.above = 0
        if self.above >= self.patience:
            self.above = 0
            out.append(self._finding(
                s, f"the smoothed loss {self.ema:.4g} is {self.ema / self.best:.1f}x its best "
                   f"{self.best:.4g} and has given back most of its progress",
                {"ema": self.ema, "best": self.best, "initial": self.initial, "trigger": "slow"}))
            self.best = self.ema  # re-arm against the new level
        return out

    def _finding(self, s: StepStats, msg: str, ev: dict) -> Finding:
        self.reported_at = s.step
        return Finding(kind="divergence", step=s.step, severity="critical", message=msg,
                       evidence={"loss": s.loss, "param_norm": s.param_norm, **ev})


class PlateauDetector(Detector):
    kind = "plateau"
    _state = ("ema", "best", "best_step", "initial", "seen", "reported")

    def __init__(self, patience: int = 100, min_improvement: float = 0.01, warmup: int = 20,
                 smoothing: float = 0.9, progress: float = 0.5) -> None:
        check_positive("patience", patience, integer=True)
        check_positive("min_improvement", min_improvement)
        self.patience, self.min_improvement, self.warmup = patience, min_improvement, warmup
        self.smoothing, self.progress = smoothing, progress
        self.ema: float | None = None
        self.best = math.inf
        self.best_step = 0
        self.initial: float | None = None
        self.seen = 0
        self.reported = False

    def reset(self) -> None:
        # after a rollback: smooth afresh, and give the restored run a full patience window
        self.ema = None
        self.best = math.inf
        self.best_step = self.seen
        self.reported = False

    def update(self, s: StepStats) -> list[Finding]:
        if not s.loss_finite or s.scaler_overflow:
            return []
        self.seen += 1
        self.ema = s.loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * s.loss
        if self.initial is None:
            self.initial = self.ema
        if self.seen <= self.warmup:
            self.best, self.best_step = min(self.best, self.ema), self.seen
            return []
        if self.ema < self.best - self.min_improvement * abs(self.best):
            self.best, self.best_step = self.ema, self.seen
            self.reported = False
            return []
        stuck = self.seen - self.best_step
        if (stuck >= self.patience and not self.reported and self.initial > 0
                and self.ema > self.progress * self.initial):
            self.reported = True
            return [Finding(
                kind="plateau", step=s.step, severity="info",
                message=(f"the loss has not improved by {self.min_improvement:.0%} in {stuck} "
                         f"steps and stays at {self.ema:.4g} (started at {self.initial:.4g})"),
                evidence={"ema": self.ema, "best": self.best, "initial": self.initial,
                          "steps": stuck},
            )]
        return []
