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
  Both fast rules also need the peak more than ``BLOWUP_NOISE`` = 6 times the batch-to-batch
  noise of the losses before the low point above their median (once 20 are known): at batch
  1-2 two or three hard examples after a confident one rise 1e4x with nothing wrong
  (``DivergenceDetector.BLOWUP_NOISE``).
  * slow: after ``warmup`` = 50 steps, the smoothed loss (EMA, 0.9) stayed above ``factor`` = 4
    times its best for ``patience`` = 10 steps *and* gave back more than half of the progress
    made since the start (a run that never improved on its first loss has no progress to
    give back: 4x its best is then enough). 4x the best is the divergence rule of LR range
    tests (fastai's LR finder, Smith 2017); the half-progress condition keeps a converged
    loss near 0 from calling its noise a divergence.

Ruin rules (calibrated on the 52 healthy streams of ``bench/calibrate_detectors.py --zoo``
before the zoo's lr_* twins were added; with them, 58 streams / 50,800 steps: 0 false alarms,
also with each ruin threshold one notch more sensitive - margin 0.25 nats, giveback 0.6,
4x/20 -> 2x/10 above start; the
failures they answer are the zoo's ``lr_*`` scenarios: a learning rate too high ruins a
language model within its first ~10 updates without any NaN or 1e4x rise, issue #9):
  * above chance (cross-entropy only): when the loss is known to be a cross-entropy whose
    uninformed-guess level is ``chance`` = ln V (the Guard infers it when the first loss is
    within 15% of ln V for the model's output size V, or is told with ``chance_loss=``), the
    median of the last 3 losses (in the first ``early`` steps or within 20 steps of an LR
    increase; later the median of the last 9, as a batch-1 run's three consecutive
    misclassified examples reach 0.94 nats above at step 610) more than ``chance_margin`` =
    0.5 nats above max(chance, first loss). Such a model is confidently wrong: it gives the true class on
    average e^-0.5 = 0.6x the probability a uniform guess gives. Healthy streams peak 0.2 nats
    above (digits MLP, batch 4, seed 1); the char GPT at 100x its working LR reaches 8-14
    nats above at steps 2-3, the LSTM LM at SGD lr 100 140-290 nats.
  * above start (any loss): the median of the last 3 losses above ``start_factor`` = 4 times
    the first loss for ``start_patience`` = 20 consecutive steps. A benign catapult rises
    above its start too (zoo ``curvature_catapult``: 45x, but for at most 7 steps; a healthy
    regressor 1.55x for 7 steps), so the rule waits three times as long.
  * gives back its progress (any loss, any time, best-so-far from step 0): the median of the
    last ``giveback_window`` = 9 losses has given back more than ``giveback`` = 0.8 of the progress made since the
    first loss (or since ``chance``), on 3 consecutive steps, once the progress exceeds 40% of
    the first loss (a batch-2 digits MLP gave back 90% of a 21% progress at step 134, noise
    early in a healthy run; tests/test_guard_kinds.py). Healthy streams give back at most 0.58 (zoo ``healthy_noisy_small_batch``,
    batch 2; 0.50 with a 5-step median on digits MLP batch 4 with momentum, 0.27 with 9); a
    GPT whose LR jumps 100x mid-run gives back everything within a few steps. The 9-step
    median keeps the best-so-far (a minimum of noisy medians, biased low) close to the true
    level: with i.i.d. 15% log-normal batch noise a 5-step median gave back 94% spuriously;
    and the median must stand ``MEDIAN_NOISE`` = 12 of its own noise above the best (a
    Poisson-NLL regression near its floor gave back "81%" of a progress its noise made up;
    see ``DivergenceDetector.MEDIAN_NOISE``). After a rollback the best restarts from the
    restored weights' losses.
  Progress is measured from a start that was untrained. A run resumed from a trained model
  (with a fresh Guard) starts near its floor, where the loss's noise looks like progress
  made and lost, so: the above-start streak and the slow rule count a step only when the
  rise is beyond ``NOISE_MARGIN`` = 5 times the noise of the first ``START_STEPS`` = 20 losses
  (:func:`start_noise`); the give-back rule arms only when the best median is below every
  one of those first losses and the progress is beyond that noise too; and an unscaled
  cross-entropy whose first loss is below ln V takes ln V as its chance level
  (``stats.chance_level``).
  The Guard's own state (``checkpoint_dir=``, ``guard.state_dict()``) carries the real start
  over a resume.
  A ruin finding whose onset is in the first ``early`` = 20 steps, or within 20 steps of a
  learning-rate increase of 2x or more (``StepStats.lr``), names the learning rate
  (``evidence["cause"] = "learning_rate"``): the loss was ruined right after the first updates
  or an LR change.

Plateau (severity "info"): after ``warmup`` steps, the smoothed loss has not improved its best
by ``min_improvement`` = 1% in ``patience_plateau`` = 100 steps while it, and the mean of the
last 100 losses (``PlateauDetector._level_stalled``), are still above half its initial value:
training is stuck, not converged (AUTOTRAINER's slow-convergence rule, ICSE
2021, adapted to the loss; ReduceLROnPlateau's relative-threshold test). Such a note comes
again only after the smoothed loss fell 30% below the level of the last one
(``PlateauDetector.RENOTE``): a loss resting on a floor of its own re-armed it from noise.
"""
from __future__ import annotations

import math
from collections import deque
from itertools import islice

from ..types import Finding, StepStats
from .base import ChanceAware, Detector, check_positive

#: remedies of a loss ruined by the learning rate (cause "learning_rate")
LR_REMEDIES = (
    "lower the learning rate: the loss was ruined right after the first updates or an LR "
    "increase (try 1/10 of it, or the LR range test's choice: trainguard doctor)",
    "add a warm-up (a few hundred steps, or ~2/(1-beta2) for Adam); clip gradients",
)

#: the last remedy of a plateau that names the learning rate: a loss that is not meant to go
#: down looks the same to the rules that judge progress
NOT_MINIMISED = ("if this loss is not meant to go down (a GAN player's, a policy-gradient "
                 "surrogate), pass judge_loss=False to the Guard: its progress is then not judged")


def _median(v: "deque[float] | list[float]") -> float:
    a = sorted(v)
    n = len(a)
    return a[n // 2] if n % 2 else 0.5 * (a[n // 2 - 1] + a[n // 2])


#: the first losses of a run, whose batch-to-batch noise says how far the loss can move with no
#: change in the model (:func:`start_noise`)
START_STEPS = 20
#: the recent losses whose noise the give-back rule weighs (DivergenceDetector.MEDIAN_NOISE)
NOISE_STEPS = 64
#: a progress rule's move must exceed ``NOISE_MARGIN`` = 5 times the start's noise
#: (:func:`start_noise`, log space): the 9-loss median moves ~0.42x the per-batch noise
#: (1.25 / sqrt(9)), so its extremes over a long run and a one-batch first loss together span
#: up to ~4x it; 5 leaves a margin. Measured on the first 20 losses (python
#: bench/calibrate_detectors.py --resumed; the digits streams): an untrained start descends
#: with a noise of 0.013-0.11 at batch 8-32 and 0.07-0.29 at batch 4 (its progress is 10x and
#: more); a run resumed from a trained model starts near its floor, where the noise is
#: 0.14-1.5 (digits MLP 0.14-1.5, a sine regression 0.21-1.0; --noise prints them) and its 9-loss medians wander
#: several-fold with no change in the model (Adam's oscillation around a near-zero fit), which the
#: rules read as progress given back: 18 of 24 resumed runs had a false divergence before
#: this test, 1 after (a smoothed loss that really rose 30x)
NOISE_MARGIN = 5.0


def start_noise(losses: "list[float]", log: bool = True) -> float | None:
    """The batch-to-batch noise of the first losses, robustly: 1.4826 times the median absolute
    deviation of their successive differences, over sqrt(2) (the standard deviation of i.i.d.
    noise; a smooth descent moves the differences' median, not their spread, and a ruin that
    begins among them moves a few differences, not their median); of their logs when ``log``
    (a multiplicative noise; every loss must then be positive), else of the raw values. None
    with fewer than 5 losses (too few to tell noise from a move)."""
    if len(losses) < 5:
        return None
    xs = [math.log(v) for v in losses] if log else list(losses)
    d = [b - a for a, b in zip(xs, xs[1:])]
    mid = _median(d)
    return 1.4826 * _median([abs(x - mid) for x in d]) / math.sqrt(2.0)


class _StartNoise:
    """The first :data:`START_STEPS` usable losses (``self.start``, in the detector's state) and
    :meth:`beyond_noise`, which the progress rules ask before they read a move as progress
    lost or a loss above its start."""

    start: "list[float]"
    #: (len(start), log noise or None, raw noise or None), recomputed when ``start`` grows
    _noise: "tuple[int, float | None, float | None] | None" = None

    def beyond_noise(self, high: float, low: float) -> bool:
        """``high`` exceeds ``low`` by more than :data:`NOISE_MARGIN` times the noise of the
        first losses: in log space when they and both values are positive, else in raw
        units."""
        st = self.start
        if self._noise is None or self._noise[0] != len(st):
            pos = all(v > 0 for v in st)
            self._noise = (len(st), start_noise(st) if pos else None,
                           start_noise(st, log=False))
        _, log_noise, raw_noise = self._noise
        if raw_noise is None:  # fewer than 5 losses: no noise to measure yet
            return True
        if high > 0 and low > 0 and log_noise is not None:
            return math.log(high / low) > NOISE_MARGIN * log_noise
        return high - low > NOISE_MARGIN * raw_noise


def _watch_lr(d: "DivergenceDetector | PlateauDetector", s: StepStats) -> None:
    """Record in ``d.lr_rise_at`` the step (``d.seen``) of a learning-rate increase of 2x or
    more; ``d.lr_seen`` trails the LR upwards by at most 1.5x a step, so a warm-up (a few
    percent a step) never counts as a jump, while a schedule that multiplies the LR does."""
    lr = s.lr
    if lr is None or not math.isfinite(lr) or lr <= 0:
        return
    if d.lr_seen is not None and lr >= 2.0 * d.lr_seen:
        d.lr_rise_at = d.seen
        d.lr_seen = lr
    else:
        d.lr_seen = lr if d.lr_seen is None else min(max(d.lr_seen, lr / 1.5), lr)


class DivergenceDetector(_StartNoise, ChanceAware, Detector):
    kind = "divergence"
    _state = ("recent", "window", "window_steps", "older", "lastp", "ema", "best", "initial",
              "above", "seen",
              "reported_at", "first_loss", "chance", "last3", "lastk", "bestk", "start_streak",
              "give_streak", "lr_seen", "lr_rise_at", "ruin_quiet_until", "start", "noise_buf")

    def __init__(self, fast_steps: int = 4, fast_factor: float = 1e4, factor: float = 4.0,
                 patience: int = 10, warmup: int = 50, smoothing: float = 0.9,
                 fast_window: int = 10, chance: float | None = None,
                 chance_margin: float = 0.5, start_factor: float = 4.0,
                 start_patience: int = 20, giveback: float = 0.8, early: int = 20,
                 ruin: bool = True, giveback_window: int = 9) -> None:
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
        #: the steps of the window's losses: a blow-up quotes the step of its low point as
        #: ``evidence["healthy_step"]``, so that a rollback restores weights from before the
        #: blow-up began (and the decision core can tell a loss that moved at those weights,
        #: the data or the loss changed, from weights that went bad: DecisionCore.rolled_back)
        self.window_steps: deque[int] = deque(maxlen=fast_window)
        #: the losses that left the window last (up to NOISE_STEPS): the last ``fast_window``
        #: of them are the level the loss held before it (:meth:`_typical`), all of them the
        #: batch-to-batch noise a blow-up must rise beyond (:meth:`_beyond_batch_noise`)
        self.older: deque[float] = deque(maxlen=max(NOISE_STEPS, fast_window))
        self.lastp: deque[float] = deque(maxlen=patience)
        #: the last NOISE_STEPS losses, whose noise the give-back rule weighs (kept across
        #: rollbacks: the noise is the data's)
        self.noise_buf: deque[float] = deque(maxlen=NOISE_STEPS)
        self.ema: float | None = None
        self.best: float | None = None
        self.initial: float | None = None
        self.first_loss: float | None = None
        self.above = 0
        self.seen = 0
        self.reported_at = -1
        check_positive("chance_margin", chance_margin)
        check_positive("start_factor", start_factor)
        check_positive("start_patience", start_patience, integer=True)
        check_positive("early", early, integer=True)
        check_positive("giveback_window", giveback_window, integer=True)
        if not 0 < giveback <= 1:
            raise ValueError(f"giveback must be in (0, 1], got {giveback!r}")
        self.chance_margin, self.start_factor = chance_margin, start_factor
        self.start_patience, self.giveback, self.early = start_patience, giveback, early
        self.chance: float | None = None
        if chance is not None:
            self.set_chance(chance)
        self.last3: deque[float] = deque(maxlen=3)
        self.lastk: deque[float] = deque(maxlen=giveback_window)
        self.bestk: float | None = None
        self.start_streak = 0
        self.give_streak = 0
        self.ruin_quiet_until = -1
        self.lr_seen: float | None = None  # lowest LR of the recent past
        self.lr_rise_at = -10**9  # step of the last >= 2x LR increase
        self.ruin = bool(ruin)  # False: only the fast and slow rules (before issue #9)
        self.start: list[float] = []  # the first losses (their noise: _StartNoise)
        #: False: only the fast rules (a 1e4x blow-up); the slow and ruin rules, which judge
        #: the loss's progress, rest. Set by the decision core when the loss is not one that
        #: should go down (``judge_loss``: losses coupled to another model's, a GAN's players)
        self.progress = True
        self.ruin_quiet_until = -1  # no second ruin finding within `patience` steps

    def reset(self) -> None:
        # after a rollback the smoothed loss restarts from the restored state's losses
        self._clear_windows()
        self.lastp.clear()
        self.above = 0
        self.ema = None
        self.last3.clear()
        self.lastk.clear()
        self.bestk = None
        self.start_streak = 0
        self.give_streak = 0
        self.ruin_quiet_until = -1

    def update(self, s: StepStats) -> list[Finding]:
        if not s.loss_usable or s.scaler_overflow:
            return []
        loss = s.loss
        self.recent.append(loss)
        if len(self.window) == self.fast_window:
            self.older.append(self.window[0])
        self.window.append(loss)
        self.window_steps.append(s.step)
        self.lastp.append(loss)
        self.noise_buf.append(loss)
        self.seen += 1
        self.ema = loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * loss
        if self.initial is None:
            self.initial = self.ema
        if self.first_loss is None:
            self.first_loss = loss
        if len(self.start) < START_STEPS:
            self.start.append(loss)
        _watch_lr(self, s)
        ruin = self._ruin(s) if self.progress else None
        if ruin is not None:
            return [ruin]
        out: list[Finding] = []
        rc = self.recent
        # the fast rule's conditions, cheapest first (all pure): most steps stop at the ratio
        if (len(rc) == self.fast_steps + 1 and rc[0] > 0 and rc[-1] / rc[0] >= self.fast_factor
                and (self.first_loss is None or rc[-1] > self.first_loss)
                and all(b > a for a, b in zip(rc, list(rc)[1:]))
                and self._typical(rc[0], len(self.window) - len(rc))
                and self._beyond_batch_noise(rc[-1], len(self.window) - len(rc))):
            r = list(rc)
            out.append(self._finding(s, f"the loss grew {r[-1] / r[0]:.1e}x in {self.fast_steps} "
                                        f"steps ({r[0]:.3g} -> {r[-1]:.3g}): exponential blow-up",
                                     {"losses": r, "trigger": "fast",
                                      **self._calm(len(self.window_steps) - len(r), s.step)}))
            self._clear_windows()
            return out
        win = self.window
        if len(win) >= 3:
            # the low point before the last two (the first one of equal lows, as min() takes)
            lo = min(islice(win, len(win) - 2))
            if (lo > 0 and win[-1] >= self.fast_factor * lo
                    and win[-2] >= math.sqrt(self.fast_factor) * lo
                    and (self.first_loss is None or win[-1] > self.first_loss)
                    and self._typical(lo, list(win).index(lo))
                    and self._beyond_batch_noise(win[-1], list(win).index(lo))):
                w = list(win)
                i = w.index(lo)
                out.append(self._finding(
                    s, f"the loss grew {w[-1] / lo:.1e}x in {len(w) - 1 - i} steps ({lo:.3g} -> "
                       f"{w[-1]:.3g}): runaway blow-up",
                    {"losses": w[i:], "trigger": "fast",
                     **self._calm(i, s.step)}))
                self._clear_windows()
                return out
        if self.seen <= self.warmup or not self.progress:
            return out
        self.best = self.ema if self.best is None else min(self.best, self.ema)
        # half the progress since the start given back; a run that never beat its first
        # loss has none to give back, so 4x its best suffices (the median of the last
        # ``patience`` losses is read only when the smoothed loss is that high)
        if (self.best > 0 and self.ema > self.factor * self.best
                and sorted(self.lastp)[len(self.lastp) // 2] > self.factor * self.best
                and (self.ema - self.best) > 0.5 * max(self.initial - self.best, 0.0)
                and self.beyond_noise(self.ema, self.best)):
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

    #: a blow-up's low point must be a level the loss left, not a lucky batch: the median of
    #: the losses up to it (the window's, and the ones that left the window last) is at most
    #: ``TYPICAL`` = sqrt(fast_factor) = 100 times it (when there are at least 3 of them).
    #: The single-example losses of a converged classifier (batch 1-4) span 1e-6 to ~3 from
    #: one batch to the next, so 1e4x over a window's lucky minimum is noise there: a digits
    #: MLP at batch 4 with one class rare (96% accuracy bare) was halted on "the loss grew
    #: 1.3e4x in 3 steps (0.000158 -> 2.01)"; its six runaway findings had the window's median
    #: 100-4,700x its minimum (a scratch run; tests/test_small_batch.py replays such a
    #: stream). A blow-up from a settled level has its median within a few times its minimum
    #: (batch noise); the losses after the low point are not counted, since a blow-up that
    #: builds up over the window lifts them (the zoo's exploding RNN after a rollback). Two
    #: hard examples in a row after a typical low still count (Adam at batch 1: median 9x the
    #: low point)
    TYPICAL = 100.0

    def _typical(self, lo: float, i: int) -> bool:
        """``lo``, the window's ``i``-th loss, is within :data:`TYPICAL` of the median of the
        losses up to it (True with fewer than 3 of them: after a rollback or at the start)."""
        older = self.older
        before = list(islice(older, max(len(older) - self.fast_window, 0), None)) + list(
            islice(self.window, i + 1))
        if len(before) < 3:
            return True
        return _median(before) <= self.TYPICAL * lo

    #: a blow-up's peak must stand above the median of the losses before its low point by more
    #: than ``BLOWUP_NOISE`` = 6 times their batch-to-batch noise (:func:`start_noise`: log
    #: space, robust to a trend), when at least 20 of them are known (up to the last
    #: NOISE_STEPS that left the window and the window's up to the low point; fewer, after a
    #: rollback or at the start: the test passes). At batch 1-2 a converged classifier's
    #: single-example losses span 1e-5 to ~5 from one step to the next, so two or three hard
    #: examples after a confident one rise 1e4x "in a few steps" with nothing wrong. Measured:
    #: ``python bench/calibrate_detectors.py --batches 1,2 --steps 10000 --seeds 3`` (18
    #: healthy digits runs) had 42 such findings in 9 runs, 0 with this test; under the Guard,
    #: ``python bench/small_batch.py`` (batch 1-2, 18 runs) acted on 11 runs and halted 3 after
    #: 8 rollbacks each (this and the changes of detect/spikes.py and the plateau's level:
    #: 2 acted, none halted). In a scratch recording of that script's runs (10,000 steps) the
    #: 140 blow-ups found stood 1.3-3.6 noises above the median before them, in streams whose
    #: noise is 1.3-6 once converged; the zoo's blow-ups 17-40 (curvature_gd_past_limit, the
    #: exploding RNN, measured on their first losses, which already rise). A converged digits
    #: MLP's noise is 0.4-0.6 at batch 32 and 0.8-1.6 at batch 8 (scratch runs of the
    #: calibration's pipeline), so there a blow-up must stand 3-10 nats (20-14,000x) above
    #: the median before this rule names it, one or two steps later than before for a loss
    #: growing 10x a step; the zoo, the fault campaign and the calibration streams decide as
    #: before. A real blow-up within a noise this large is left to the rules that do not read
    #: single steps (above chance, gives back its progress, the slow rule) and to the
    #: non-finite rule
    BLOWUP_NOISE = 6.0

    def _beyond_batch_noise(self, peak: float, i: int) -> bool:
        """``peak`` stands above the losses before the window's ``i``-th (a blow-up's low
        point) by more than :data:`BLOWUP_NOISE` times their batch-to-batch noise (True when
        fewer than 20 positive ones are known or one is negative; a loss of exactly 0, an
        underflow, is left out)."""
        before = list(self.older) + list(islice(self.window, i + 1))
        if peak <= 0 or min(before, default=-1.0) < 0:
            return True
        before = [v for v in before if v > 0]  # a confident example's loss underflows to 0
        if len(before) < 20:
            return True
        sigma = start_noise(before)
        if sigma is None:
            return True
        return math.log(peak / _median(before)) > self.BLOWUP_NOISE * sigma

    #: a 9-loss median given back must rise above the best by more than ``MEDIAN_NOISE`` = 12
    #: times the noise of such a median at the present level (in log space: 1.2533 x the
    #: batch-to-batch noise of the last :data:`NOISE_STEPS` = 64 losses, :func:`start_noise`,
    #: over sqrt(9); the run's first START_STEPS losses left out). The best is the lowest of
    #: thousands of noisy medians, biased low by ~3.5 of their standard deviations, and the
    #: present median wanders ~3 above its level for three steps in a row; a loss whose noise
    #: is large against its progress then "gives back" most of a progress it never made. The
    #: start-noise test cannot tell: a Poisson NLL's first losses are all ~1.0 (exp(0) - y*0)
    #: with a noise of 0.02, where the noise at its level is ~0.17. Measured: such a
    #: regression (Adam 1e-3, batch 32) went from 0.97 to 0.73 and read "given back 81% of
    #: the progress made from 0.9685 down to its best 0.5266", a rollback and an LR cut in a
    #: healthy run (seeds 1 and 3 of 0-3); its give-backs stood at most 10.6 median noises
    #: above the best (a scratch run of the same model with a StepLR). Synthetic streams like
    #: it (batch noise 0.2 and 0.4) gave back on 29/40 and 40/40 seeds before this test, 0/40
    #: after; a 3x rise of them is found on 40/40 (median delay 6 and 123 steps; python
    #: bench/giveback_noise.py). Real losses of everything: the zoo's 60-layer ReLU net after
    #: LSUV (signal_relu_xavier_deep, structural repair, seed 0, one thread) falls from 0.99
    #: back to 2.24 = ln 10 at 12.3-13.1 (at 15 it was found 62 steps later, by the
    #: above-chance rule); the digits MLP whose ReLUs are killed at step 60 at ~97
    #: (tests/test_guard_kinds.py). The margin is thin on both sides (10.6 / 12 / 12.3). When
    #: the noise is not known (fewer than 20 losses after the first START_STEPS, a loss that
    #: is not positive) the test passes.
    MEDIAN_NOISE = 12.0

    def _beyond_median_noise(self, mk: float, best: float) -> bool:
        """``mk`` stands above ``best`` by more than :data:`MEDIAN_NOISE` times the noise of a
        median of the last ``giveback_window`` losses (True when that noise is not known: fewer
        than 20 losses since the run's first :data:`START_STEPS`, or a loss that is not
        positive)."""
        buf = list(self.noise_buf)
        if self.seen < START_STEPS + len(buf):
            buf = buf[START_STEPS - self.seen + len(buf):]  # the start's own quiet is not the noise
        if len(buf) < 20 or mk <= 0 or best <= 0 or min(buf) <= 0:
            return True
        sigma = start_noise(buf)
        if sigma is None:
            return True
        return math.log(mk / best) > self.MEDIAN_NOISE * 1.2533 * sigma / math.sqrt(
            len(self.lastk))

    def _clear_windows(self) -> None:
        self.recent.clear()
        self.window.clear()
        self.window_steps.clear()
        self.older.clear()

    def _calm(self, i: int, step: int) -> dict:
        """``{"healthy_step": ...}``: the step of the window's ``i``-th loss, the low point a
        blow-up started from (empty when that is this step)."""
        at = self.window_steps[i] if 0 <= i < len(self.window_steps) else step
        return {"healthy_step": at} if at < step else {}

    def _lr_cause(self, onset: int) -> bool:
        """The ruin began (``onset``, in steps seen) within the first ``early`` steps or
        within 20 steps after (or, median lag, 10 before) a 2x LR increase."""
        # the onset is estimated from a median's lag, so it may precede the rise by a few steps
        return onset <= self.early or -10 <= onset - self.lr_rise_at <= 20

    def _ruin(self, s: StepStats) -> Finding | None:
        """The three ruin rules (above chance, above start, gives back its progress)."""
        loss, l0 = s.loss, self.first_loss
        self.last3.append(loss)
        self.lastk.append(loss)
        if not self.ruin or l0 is None or len(self.last3) < 3 or self.seen <= self.ruin_quiet_until:
            return None
        m3 = sorted(self.last3)[1]  # the median of three
        lastk = self.lastk
        mk: float | None = None  # the median of the last ``giveback_window``, read at most once
        rule: str | None = None
        msg = ""
        onset = self.seen
        if self.chance is not None:
            ref = max(self.chance, l0)
            # early or right after an LR rise: 3 losses; later a 9-loss median, so that a few
            # confidently wrong single examples (batch 1) are not a ruin
            fresh = self.seen <= self.early or 0 <= self.seen - self.lr_rise_at <= 20
            n = 3 if fresh else (self.lastk.maxlen or 9)
            if fresh:
                level = m3
            elif len(lastk) == n:
                level = mk = _median(lastk)
            else:
                level = -math.inf
            if level > ref + self.chance_margin:
                rule, onset = "above_chance", self.seen - n // 2
                msg = (f"the loss {level:.4g} (median of the last {n}) is {level - ref:.2g} nats above "
                       f"the uninformed-guess level {ref:.4g} (ln V = {self.chance:.4g}): the "
                       "model has become confidently wrong")
        if rule is None and l0 > 0:
            self.start_streak = (self.start_streak + 1 if m3 > self.start_factor * l0
                                 and self.beyond_noise(m3, l0) else 0)
            if self.start_streak >= self.start_patience:
                rule, onset = "above_start", self.seen - self.start_streak - 1
                msg = (f"the loss {m3:.4g} (median of the last 3) has stayed above "
                       f"{self.start_factor:g}x its first value {l0:.4g} for "
                       f"{self.start_streak} steps")
        if rule is None and len(lastk) == lastk.maxlen:
            if mk is None:
                mk = _median(lastk)
            self.bestk = mk if self.bestk is None else min(self.bestk, mk)
            top = max(l0, self.chance) if self.chance is not None else l0
            progress = top - self.bestk
            if (progress > 0.4 * abs(top) and mk - self.bestk > self.giveback * progress
                    and self.bestk < min(self.start) and self.beyond_noise(top, self.bestk)
                    and self._beyond_median_noise(mk, self.bestk)):
                self.give_streak += 1
            else:
                self.give_streak = 0
            if self.give_streak >= 3:
                rule, onset = "giveback", self.seen - self.give_streak - len(self.lastk) // 2
                msg = (f"the loss {mk:.4g} (median of the last {len(self.lastk)}) has given back "
                       f"{(mk - self.bestk) / progress:.0%} of the progress made from "
                       f"{top:.4g} down to its best {self.bestk:.4g}")
        if rule is None:
            return None
        lr_cause = self._lr_cause(onset)
        ev: dict = {"trigger": rule, "median_loss": m3, "first_loss": l0,
                    "chance": self.chance, "best": self.bestk}
        remedies: tuple[str, ...] = ()
        if lr_cause:
            ev["cause"] = "learning_rate"
            when = (f"within the first {max(onset, 1)} steps" if onset <= self.early
                    else f"{max(onset - self.lr_rise_at, 0)} steps after the learning rate rose "
                         "2x or more")
            msg += f"; it happened {when}: the learning rate is too high"
            remedies = LR_REMEDIES
        self.start_streak = self.give_streak = 0
        self.ruin_quiet_until = self.seen + self.patience
        self.last3.clear()
        self.lastk.clear()
        self._clear_windows()
        f = self._finding(s, msg, ev)
        if remedies:
            f.remedies = remedies
        return f

    def _finding(self, s: StepStats, msg: str, ev: dict) -> Finding:
        self.reported_at = s.step
        return Finding(kind="divergence", step=s.step, severity="critical", message=msg,
                       evidence={"loss": s.loss, "param_norm": s.param_norm, **ev})


class PlateauDetector(_StartNoise, ChanceAware, Detector):
    """Plateau; when the evidence points at the learning rate, the finding says so and never
    advises raising it (``evidence["cause"] = "learning_rate"``, remedies: lower it), when
    any of these holds (issue #9: the old advice, "raise the learning rate", was the opposite
    of the fix for a loss ruined by a too-high LR):

    * the smoothed loss is more than 10% above where it started (a stuck run sits at its start
      give or take its noise, a ruined one well above it: the LSTM LM at SGD lr 100 sits at
      7x);
    * the loss collapsed (the median of the last 5 losses above both ``jump`` = 2x the best
      smoothed loss and the starting level; single examples of a batch-1 run jump above both,
      five in a row do not) or the LR rose 2x or more
      within 20 steps before or at any time after the best was reached: the run collapsed
      right after a spike or an LR change;
    * on ``ur_patience`` = 2 consecutive sampled updates the median update-to-weight ratio
      exceeded ``ur_high`` = 0.3. The usual ratio is ~1e-3 (Karpathy's rule of thumb); over
      52 healthy streams the median per-module ratio after step 50 peaked at 0.08 (GD at the
      edge of stability) and mostly stayed below 0.036; Adam at 100x its LR on an LSTM
      measures ~1-10.
    A plateau with that cause takes the ladder ``plateau:learning_rate`` (rollback + LR
    backoff); other plateaus are only reported, with advice that follows the last sampled
    update-to-weight ratio when there is one: at ``ur_large`` = 0.01 or more (10x the ~1e-3
    rule of thumb, cs231n "Neural Networks 3": "if this is too high ... the learning rate is
    probably too high") it says to lower the learning rate, at ``ur_small`` = 1e-4 or less
    (a tenth of it) to raise it; in between, or with no ratio yet, the usual advice. (nanoGPT
    at 100x its learning rate, AdamW, clip 1.0: its loss stalled at 3.2 where the healthy run
    reaches 2.2, with update ratios of 0.013-0.025, and the advice was to raise the learning
    rate; the healthy run's ratios fell from 0.011 to 0.001.)
    """

    kind = "plateau"
    _state = ("ema", "best", "best_step", "initial", "seen", "reported", "lr_seen",
              "lr_rise_at", "jump_at", "ur_streak", "ur_last", "recent", "start", "noted_at",
              "pending", "level")

    def _level_stalled(self) -> bool:
        """The mean of the last ``patience`` losses (``level``) stands above ``progress`` x the
        start (and the chance level), as the smoothed loss must; True with fewer than 5 losses.

        A stall holds the loss's level, not one moment of the smoothed loss. At batch 1 the
        smoothed loss (EMA 0.9) of a converged classifier is lifted above half its start by a
        few hard examples in a row (momentum SGD after a hard example mispredicts the next
        few), while its best is a lucky quiet stretch never beaten again: a digits MLP at batch
        1 under momentum SGD was told "the loss has not improved by 1% in 770 steps and stays
        at 1.576 (started at 2.408); it collapsed right after a loss spike" and rolled back
        with its LR cut 10x (a scratch run of bench/small_batch.py's kind). The mean over the
        stall is the loss the run is stuck at: on that script's runs (a scratch recording,
        10,000 steps) it peaks at 0.12-0.30 of the first loss after step 1,000; the zoo's
        data_small_batch (momentum SGD 0.5 at batch 2), stuck, holds 1.43 against its start's
        2.37 at step 221, where a 25-loss median, the first version of this test, read 1.18
        against the bar of 1.19 and let the repair wait until step 367 (the run then failed
        its criterion).
        """
        if len(self.level) < 5:
            return True
        m = math.fsum(self.level) / len(self.level)
        return (m > self.progress * self.initial  # type: ignore[operator]
                and (self.chance is None or m > self.progress * self.chance))

    #: a plateau without a cause (severity "info") is noted again only once the smoothed loss
    #: has fallen to ``RENOTE`` = 0.7 of the level of the last such note (30% lower: a new
    #: stage of progress, then a new stall). The 1% best that re-arms the rule is a minimum of
    #: a noisy smoothed loss, so a loss resting on a floor of its own (a Poisson or Gaussian
    #: NLL, a label-smoothed or noisy-label cross-entropy, an MSE on noisy targets) sets a new
    #: one every few hundred steps: a Poisson-NLL regression at its floor (python
    #: bench/giveback_noise.py, seeds 0-3) was told "the loss has not improved by 1% in 100
    #: steps" 6-7 times in 3,000 steps; once with 0.7, once or twice with 0.8 (its loss fell
    #: 26% after the first note, from 0.87 to 0.64). A plateau that names the learning rate is
    #: reported as before.
    RENOTE = 0.7

    def __init__(self, patience: int = 100, min_improvement: float = 0.01, warmup: int = 20,
                 smoothing: float = 0.9, progress: float = 0.5, jump: float = 2.0,
                 ur_high: float = 0.3, ur_patience: int = 2, ur_large: float = 0.01,
                 ur_small: float = 1e-4, age_share: float = 0.5) -> None:
        check_positive("patience", patience, integer=True)
        check_positive("min_improvement", min_improvement)
        check_positive("age_share", age_share)
        #: a plateau without a cause (severity "info") is noted once the loss has not improved
        #: by ``min_improvement`` for ``patience`` steps *and* for ``age_share`` = 0.5 of the
        #: steps seen so far: a stall as long as half the run's age. A loss that keeps
        #: falling as a power of the step (L ~ a + b t^-c, as language models and most long
        #: runs do) improves by a fixed share per doubling of the steps, more slowly per 100
        #: steps the longer it runs; the fixed 100-step window alone called every healthy run
        #: of karpathy/makemore a plateau (bigram, MLP, RNN, GRU, BoW and Transformer at its
        #: defaults, AdamW 5e-4: noted at steps 314-664 while their training losses still fell
        #: 1.7-7% from step 500 to 1,000 and again to 2,000; ``python bench/makemore_trial.py``,
        #: now silent). The stuck steps are counted from the best, the age in losses seen
        #: (kept in the detector's state across a checkpoint). A run stuck from its start
        #: (its best within the first ``patience`` steps, the zoo's stalls) is noted when it
        #: was before; a plateau whose cause is the learning rate keeps the fixed window, and so
        #: does one whose last sampled update-to-weight ratio is ``ur_large`` or more (its
        #: advice: lower the learning rate): nanoGPT at 100x its learning rate (``python
        #: bench/nanogpt_trial.py ... --lr 0.1``) stalls at 3.6 with updates 0.019 of the
        #: weights, and is told so at step 219 either way (with the age rule alone, not at all
        #: in its 400 steps: its loss still creeps down 1% now and then).
        self.age_share = age_share
        self.patience, self.min_improvement, self.warmup = patience, min_improvement, warmup
        self.smoothing, self.progress = smoothing, progress
        self.ema: float | None = None
        self.best = math.inf
        self.best_step = 0
        self.initial: float | None = None
        self.seen = 0
        self.reported = False
        check_positive("jump", jump)
        check_positive("ur_high", ur_high)
        check_positive("ur_patience", ur_patience, integer=True)
        self.jump, self.ur_high, self.ur_patience = jump, ur_high, ur_patience
        check_positive("ur_large", ur_large)
        check_positive("ur_small", ur_small)
        self.ur_large, self.ur_small = ur_large, ur_small
        self.lr_seen: float | None = None
        self.lr_rise_at = -10**9
        self.jump_at = -10**9
        self.recent: deque[float] = deque(maxlen=5)
        #: the last ``patience`` losses (:meth:`_level_stalled`)
        self.level: deque[float] = deque(maxlen=patience)
        self.start: list[float] = []  # the first losses (their noise: _StartNoise)
        #: the uninformed-guess level of a cross-entropy (ln V) when known: a run that starts
        #: from a trained model below half of it has made its progress already and is not
        #: stuck (a resumed digits classifier at 0.005 was called "stuck, not converged")
        self.chance: float | None = None
        self.ur_streak = 0
        self.ur_last: float | None = None
        #: the smoothed loss of the last plateau noted without a cause (see RENOTE)
        self.noted_at: float | None = None
        #: a plateau without a cause judged at ``patience``, waiting for ``age_share``
        self.pending = False

    def reset(self) -> None:
        # after a rollback: smooth afresh, and give the restored run a full patience window
        self.ur_streak = 0
        self.ema = None
        self.best = math.inf
        self.best_step = self.seen
        self.reported = False
        self.pending = False
        self.noted_at = None

    def update(self, s: StepStats) -> list[Finding]:
        if not s.loss_usable or s.scaler_overflow:
            return []
        self.seen += 1
        _watch_lr(self, s)
        self.recent.append(s.loss)
        self.level.append(s.loss)
        if len(self.start) < START_STEPS:
            self.start.append(s.loss)
        if (len(self.recent) == self.recent.maxlen and self.initial is not None
                and (m5 := _median(self.recent)) > max(self.jump * self.best, self.initial)
                and self.beyond_noise(m5, self.best)):
            self.jump_at = self.seen  # a collapse above the starting level
        st = s.optimizer_state or {}
        ur = st.get("update_ratio")
        if ur is not None and math.isfinite(ur):
            self.ur_last = float(ur)
            self.ur_streak = self.ur_streak + 1 if ur > self.ur_high else 0
        self.ema = s.loss if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * s.loss
        if self.initial is None:
            self.initial = self.ema
        if self.seen <= self.warmup:
            self.best, self.best_step = min(self.best, self.ema), self.seen
            return []
        # after a rollback the best restarts at inf (reset), where inf - 1% of inf is NaN: the
        # first smoothed loss is the new best, or no loss ever improved on it
        if self.best == math.inf or self.ema < self.best - self.min_improvement * abs(self.best):
            self.best, self.best_step = self.ema, self.seen
            self.reported = self.pending = False
            return []
        stuck = self.seen - self.best_step
        stalled = (self.initial > 0 and self.ema > self.progress * self.initial
                   and (self.chance is None or self.ema > self.progress * self.chance))
        # the level (a mean of 100 losses) is read last, only when a note is due
        if stuck >= self.patience and not self.reported and stalled and self._level_stalled():
            self.reported = True
            why = self._lr_evidence()
            if why:
                msg, ev = self._stall(stuck)
                ev["cause"] = "learning_rate"
                return [Finding(kind="plateau", step=s.step, severity="warning",
                                message=f"{msg}; {why}: the learning rate is too high",
                                evidence=ev, remedies=LR_REMEDIES + (NOT_MINIMISED,))]
            self.pending = True  # no cause: noted once the stall is long for the run's age
        fast = self.ur_last is not None and self.ur_last >= self.ur_large  # "lower the LR"
        if (self.pending and stalled and (fast or stuck >= self.age_share * self.seen)
                and self._level_stalled()):
            self.pending = False
            msg, ev = self._stall(stuck)
            if self.noted_at is not None and self.ema > self.RENOTE * self.noted_at:
                return []  # the stall already noted, seen again (see RENOTE)
            self.noted_at = self.ema
            ur = self.ur_last
            if ur is None or self.ur_small < ur < self.ur_large:
                return [Finding(kind="plateau", step=s.step, severity="info", message=msg,
                                evidence=ev, remedies=self._usual_advice(s.optimizer))]
            ev["update_ratio"] = ur
            size = f"updates are {ur:.2g} of the weights' norm per step (usual: ~1e-3)"
            if ur >= self.ur_large:
                advice = (f"lower the learning rate: {size}; a plateau-driven schedule "
                          "(ReduceLROnPlateau) lowers it when the loss stalls",
                          "check it with the LR range test (trainguard doctor)",
                          "check init and activations (see vanishing_gradient / dead_units)")
            else:
                advice = (f"raise the learning rate: {size}",
                          "check it with the LR range test (trainguard doctor)",
                          "check init and activations (see vanishing_gradient / dead_units)")
            return [Finding(kind="plateau", step=s.step, severity="info",
                            message=f"{msg}; {size}", evidence=ev, remedies=advice)]
        return []

    #: the usual advice for a run whose optimizer adapts its steps itself (Adam, RMSprop,
    #: Adagrad, Lion): the default's "switch optimizer (SGD -> Adam)" told an Adam run to
    #: switch to Adam (a SimCLR-style contrastive run on digits, Adam 1e-3, temperature 0.5,
    #: whose loss had settled at its floor, 3.9, was noted at step 1,311 with that advice)
    ADAPTIVE_ADVICE = (
        "raise the learning rate a notch if the loss sits above what the model should reach "
        "(the LR range test, trainguard doctor, finds the range)",
        "if the loss has converged: a plateau-driven schedule (ReduceLROnPlateau) lowers the "
        "learning rate to refine it, or stop",
        "check init and activations (see vanishing_gradient / dead_units)",
    )

    def _usual_advice(self, optimizer: str | None) -> tuple[str, ...]:
        """The plain plateau's advice: the default one (:data:`trainguard.types.REMEDIES`),
        or :data:`ADAPTIVE_ADVICE` for an adaptive optimizer."""
        if optimizer in ("adam", "adamw", "rmsprop", "adagrad", "lion"):
            return self.ADAPTIVE_ADVICE
        return ()

    def _stall(self, stuck: int) -> tuple[str, dict[str, object]]:
        """The plateau's message and evidence."""
        msg = (f"the loss has not improved by {self.min_improvement:.0%} in {stuck} "
               f"steps and stays at {self.ema:.4g} (started at {self.initial:.4g})")
        return msg, {"ema": self.ema, "best": self.best, "initial": self.initial, "steps": stuck}

    def _lr_evidence(self) -> str:
        """Why the learning rate is to blame for this plateau ("" when nothing says so)."""
        assert self.ema is not None and self.initial is not None
        if self.ema > 1.1 * self.initial and self.beyond_noise(self.ema, self.initial):
            return "the loss is above where it started"
        since = self.best_step - 20
        if self.jump_at >= since:
            return "it collapsed right after a loss spike"
        if self.lr_rise_at >= since:
            return "it collapsed right after the learning rate rose"
        if self.ur_streak >= self.ur_patience and self.ur_last is not None:
            return (f"updates are {self.ur_last:.2g} of the weights' norm on each sampled step "
                    "(usual: ~1e-3)")
        return ""
