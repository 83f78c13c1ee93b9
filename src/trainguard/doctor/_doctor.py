"""``doctor()``: diagnose a model before (or instead of) a long training run."""
from __future__ import annotations

import math
import time
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..types import Finding
from ._common import (DoctorInputError, LossFn, clone_model, clone_optimizer, configured_optimizer,
                      freeze_dropout, has_training_step, lr_of, model_device, preserved_rng,
                      loss_of, probe_batch, set_lr, train_steps, trainable, validate_inputs)
from .curvature import Curvature, optimizer_limit, sharpness
from .lr_range import RangeTest, range_test
from .noise import NOISE_LR_FACTOR, noise_scale
from .precision import (HEADROOM_WARN_BITS, SWAMPING_FRACTION, UNDERFLOW_FRACTION, audit)
from .prescribe import prescribe
from .propagation import findings_from, measure, residual_blocks, verdicts
from .report import DoctorReport

#: LR this many times the curvature limit is beyond the catapult range: divergent phase
#: η > η_max ≈ 4/λ₀ = 2×(2/λ₀) (Lewkowycz 2020, mechanisms §3.5). Between 1× and 2× the
#: run may catapult (benign), reported as info.
CATAPULT_FACTOR = 2.0
#: Above this multiple of the limit even ReLU nets diverge: η_max ≈ 12/λ₀ empirically for
#: ReLU nets (Lewkowycz 2020 [M], mechanisms §3.5) = 6 × (2/λ₀). Only when the trial steps
#: agree: the argument needs the loss quadratic along the top direction, and a direction
#: through a softmax's logits is not (its loss is bounded: the step saturates the attention).
#: The Lightning demo Transformer (``lightning.pytorch.demos.transformer``, SGD 0.1) has its
#: top curvature, λ ≈ 4e3, in the first self-attention's input projection (its input is the
#: embedding times sqrt(200)); at 213× the limit its trial steps and its training fall (7.8 to
#: 2.8 in 300 steps), and it was told "[error] the top direction diverges geometrically: set
#: the learning rate to 0.000235". Past this factor with improving trial steps the finding is
#: info; every zoo scenario past it diverges in its trial steps (error, as before).
RELU_CATAPULT_FACTOR = 6.0
#: Trial losses "improve" when the mean of the last quarter is below the mean of the first.
#: Suggested LR = this fraction of the curvature limit for (S)GD: leaves room for
#: progressive sharpening (λ_max rises to 2/η during training, Cohen 2021, §3.2).
LIMIT_SAFETY = 0.5
#: Suggested LR ≤ the range test's divergence LR / 4 (Smith 2017: base_lr = max_lr/3 or /4, §3.6).
RANGE_DIVISOR = 4.0
#: A learning rate this many times below the largest safe LR (``lr_cap``) is reported (info)
#: as too low, and only then does the suggestion raise it.
LR_TOO_LOW_FACTOR = 100.0
#: A raise is one notch of the usual half-decade LR grid (1e-3, 3e-3, 1e-2): the curvature
#: limit and the range test are measured near initialisation, and sharpness grows during
#: training (progressive sharpening, Cohen 2021), so the room they show is an upper bound.
#: Measured (bench/doctor_lr.py, issue #9): suggestions up to the measured room, 4-490x the
#: working LR, ruined the zoo's healthy CNN (23x), char Transformer and an Adam MLP.
RAISE_STEP = 3.0
#: Trial losses: the run diverges in the first steps when the loss rises above this multiple
#: of its initial value (the range test's 4× rule, §3.6) or becomes non-finite.
DIVERGE_FACTOR = 4.0
#: An adaptive optimizer's trial steps blow up when their loss rises above ``BLOWUP_FACTOR`` =
#: 2.5 times the first (and, for a transient blow-up, comes back below ``DIVERGE_FACTOR`` times
#: it by the last step). Such a trial is run again from the same start at the LR divided by
#: ``RAISE_STEP`` = 3, one notch of the half-decade grid at a time, at most ``CALM_TRIES`` = 3
#: times (down to 1/27: past the "1/10 of it" the Guard's divergence advice gives); the first LR
#: whose trial stays within ``BLOWUP_FACTOR`` caps the suggestion (the lowest tried when none
#: does); a trial that diverged (``DIVERGE_FACTOR``) is retried the same way. Measured on a DDPM
#: denoiser (``bench/diffusion_trial.py``'s SiLU MLP on digits, Adam 3e-2, seed 1): its trial
#: losses went 1.01 -> 24.96 at trial step 5 -> 1.19, the doctor called it healthy, and 3 of 4
#: seeds collapsed to predicting zero noise (loss 1.00 after 3,000 steps) where 1e-2 trains on
#: all four; at Adam 2e-2 its trial rose 3.6x and came back, and the limit measured after it
#: (66) made the doctor suggest raising the LR to 6e-2. Adam's curvature limit is measured
#: after the trial steps (its preconditioner needs them), on the weights a blow-up left, so it
#: cannot see one. 2.5: the zoo's healthy trials peak at most 1.36x their first loss
#: (``healthy_mlp_regressor``; the SGD catapult below aside), ``adam_stale_second_moment`` 1.97x;
#: LR faults 2.77x (nanoGPT at 100x its LR), 3.07x (the zoo's GPT at 100x), 3.6x and more (the
#: DDPM); ``python bench/doctor_lr.py`` gives each zoo model's ``trial_peak``. (S)GD is
#: left to the curvature limit, measured before its trial steps: a rise and fall there is the
#: catapult, benign between 2/λ and ~4/λ (Lewkowycz 2020; the zoo's ``curvature_catapult``
#: rises 52x at trial step 5 and converges)
BLOWUP_FACTOR = 2.5
CALM_TRIES = 3
#: The suggestion raises an LR far below the measured room only when its trial steps were calm:
#: their loss never above ``RAISE_CALM`` = 1.5 times the first (the zoo's healthy trials peak at
#: most 1.36x but for the SGD catapult, whose LR is lowered; every raise the zoo gets comes from
#: a trial that peaked at 1.01x or less). A
#: trial that rose says nothing of the room above the LR, least of all through a curvature
#: limit measured after it
RAISE_CALM = 1.5
#: Adam epsilon trap: fraction of coordinates with √v̂ < ε above which ε dominates the update
#: (mechanisms §1 row 10; heuristic 50 %).
EPS_FRACTION = 0.5


def doctor(model: nn.Module, loss_fn: LossFn, data: Iterable, optimizer: torch.optim.Optimizer | None = None,
           *, steps: int = 20, lr_range: bool = True, precision: bool = True, noise: bool = True,
           max_batches: int = 32, probe_size: int = 256, range_steps: int = 100,
           seed: int = 0, progress: bool | None = None) -> DoctorReport:
    """Diagnose ``model`` trained with ``loss_fn(model(x), y)`` on ``data`` (an iterable of
    ``(x, y)`` batches; at most ``max_batches`` are read) by ``optimizer`` (default: plain SGD,
    lr 0.01).

    Everything runs on copies: the model's parameters, buffers, gradients and mode, the
    optimizer's state and the global RNG states are unchanged afterwards.

    ``loss_fn=None``: the model computes its own loss. It is called as ``model(x, y)``
    (nanoGPT's and makemore's ``forward(idx, targets)``), or ``model(**batch)`` when a batch
    is a mapping (a Hugging Face batch with ``labels``), and its loss is read from what it
    returns: a scalar tensor, an output's ``loss`` (``ModelOutput``, a dict), or the scalar
    tensor of a tuple (``(logits, loss)``). A LightningModule's loss is its
    ``training_step(batch, 0)``'s (a batch as the DataLoader yields it), and without an
    ``optimizer`` the one its ``configure_optimizers()`` builds is used.

    ``steps``: optimizer steps taken on a copy before the second propagation measurement
    (and, for Adam, to populate the preconditioner). Set ``lr_range``, ``precision`` or
    ``noise`` to False to skip those parts. ``progress``: print each phase with an ETA on
    stderr (None: when stderr is a terminal).
    """
    t0 = time.perf_counter()
    if optimizer is None and loss_fn is None and has_training_step(model):
        optimizer = configured_optimizer(model)  # a LightningModule's own
    batches = validate_inputs(model, loss_fn, data, optimizer, max_batches)
    if steps < 0:
        raise DoctorInputError(f"steps must be ≥ 0, got {steps}")
    device = model_device(model)
    lr = lr_of(optimizer)
    kind, c_limit, pre = optimizer_limit(optimizer)
    findings: list[Finding] = []
    from ..progress import Progress
    prog = Progress(2 + int(bool(noise)) + int(bool(lr_range)) + int(bool(precision)), "doctor",
                    enabled=progress)
    with preserved_rng(), prog:
        torch.manual_seed(seed)
        probe = probe_batch(batches, probe_size)
        prog.start("signal propagation and curvature at initialisation")

        # -- 1. signal propagation at init, curvature at init ---------------------------
        m = clone_model(model)
        freeze_dropout(m)
        init_stats, loss0 = measure(m, loss_fn, probe, device, seed=seed)
        for p in m.parameters():
            p.grad = None
        if not math.isfinite(loss0):
            findings.append(Finding("nonfinite", 0, f"the loss on the probe batch is {loss0} at "
                                    "initialisation", severity="error", origin="forward",
                                    evidence={"loss": loss0}))
        opt_c = clone_optimizer(optimizer, model, m)
        curv: Curvature | None = None
        has_state = optimizer is not None and len(optimizer.state) > 0
        if math.isfinite(loss0) and (not pre or has_state):
            curv = sharpness(m, loss_fn, probe, device, optimizer, lr, opt_for_P=opt_c, seed=seed)
        ns = None
        if noise:
            prog.start("gradient noise scale")
            if math.isfinite(loss0):
                ns = noise_scale(m, loss_fn, batches, device)
        # -- trial steps on the copy ----------------------------------------------------
        prog.start(f"{steps} trial steps")
        losses = train_steps(m, opt_c, loss_fn, batches, steps, device) if steps else []
        grad_norms = []
        after_stats = None
        finite_params = all(torch.isfinite(p).all() for p in m.parameters())
        if losses and finite_params:
            after_stats, _ = measure(m, loss_fn, probe, device, seed=seed)
            gn = _take_grad_norm(m)
            grad_norms = [gn] if math.isfinite(gn) else []
            if pre and curv is None:
                curv = sharpness(m, loss_fn, probe, device, optimizer, lr, opt_for_P=opt_c, seed=seed)
        if curv is None and pre and math.isfinite(loss0):
            curv = sharpness(clone_model(model), loss_fn, probe, device, None, lr, seed=seed)
            curv.optimizer = kind
            curv.note = "preconditioner unavailable (no steps); limit from the raw Hessian"
        if losses:
            l0, bad = losses[0], [v for v in losses if not math.isfinite(v)]
            if bad or (len(losses) > 3 and losses[-1] > DIVERGE_FACTOR * max(l0, 1e-12)):
                findings.append(Finding(
                    "divergence", len(losses),
                    f"the loss went from {l0:.4g} to {losses[-1]:.4g} in {len(losses)} trial steps "
                    f"at lr {lr:.3g}", severity="error",
                    evidence={"losses": losses[:50], "lr": lr}))
        calm_lr = math.nan
        clip_lr: float | None = None  # the LR of the trial the clip is measured after, if not lr
        trial_diverged = next((f for f in findings if f.kind == "divergence"), None)
        blowup = _blowup(losses) if pre and trial_diverged is None else None
        if pre and (blowup is not None or trial_diverged is not None) and losses[0] > 0:
            # Adam's limit is measured after the trial steps, on the weights a blow-up left: the
            # first LR whose trial stays calm caps the suggestion instead (CALM_TRIES)
            calm, tried, calm_gn = _calm_lr(model, optimizer, loss_fn, batches, steps, device,
                                            seed, lr, probe)
            # the clip: the gradient after the calm LR's trial, not the wrecked weights'; none
            # when no LR tried stayed calm (a denoiser at Adam 2.0 was told to clip at 3.9e9)
            grad_norms = [calm_gn] if math.isfinite(calm_gn) else []
            clip_lr = calm if math.isfinite(calm_gn) else None
            found = {"calm_lr": calm if math.isfinite(calm) else None,
                     "tried": [[a, b] for a, b in tried]}
            if blowup is not None:
                peak, at = blowup
                l0 = losses[0]
                msg = (f"the trial loss rose from {l0:.4g} to {peak:.4g} ({peak / l0:.1f}x) at "
                       f"trial step {at} before falling back to {losses[-1]:.4g}: the first "
                       f"updates at lr {lr:.3g} blow up")
                msg += (f"; at lr {calm:.3g} the trial steps stay within {BLOWUP_FACTOR:g}x their "
                        "first loss" if math.isfinite(calm) else
                        f"; they blew up at every lower LR tried, down to {tried[-1][0]:.3g}")
                findings.append(Finding(
                    "lr_too_high", len(losses), msg, severity="warning",
                    evidence={"trigger": "trial_blowup", "lr": lr, "first_loss": l0,
                              "peak": peak, "peak_step": at, "last_loss": losses[-1], **found,
                              "losses": losses[:50]}))
            elif trial_diverged is not None:
                trial_diverged.evidence.update(found)
            calm_lr = calm if math.isfinite(calm) else tried[-1][0]
        # Adam epsilon trap
        if pre and optimizer is not None:
            tot, small = 0, 0
            for g in opt_c.param_groups:
                eps = float(g.get("eps", 1e-8))
                for p in g["params"]:
                    st = opt_c.state.get(p, {})
                    if "exp_avg_sq" in st:
                        step = st.get("step", 1)
                        step = float(step.item() if isinstance(step, torch.Tensor) else step)
                        b2 = float(g.get("betas", (0.9, 0.999))[1])
                        v = (st["exp_avg_sq"].float() / (1 - b2 ** max(step, 1.0))).sqrt()
                        live = v[v > 0]  # exact zeros are dead units, not the eps trap
                        tot += live.numel()
                        small += int((live < eps).sum())
            if tot and small / tot > EPS_FRACTION:
                findings.append(Finding(
                    "adam_epsilon", steps, f"{small / tot:.0%} of coordinates have √v̂ below eps: "
                    "eps, not the gradient, sets the step size", severity="warning",
                    evidence={"fraction": small / tot}))
        del m, opt_c

        layers = verdicts(init_stats, after_stats)
        findings.extend(findings_from(layers, model))

        # -- 2. LR range test ------------------------------------------------------------
        rt: RangeTest | None = None
        if lr_range:
            prog.start("LR range test")
        if lr_range and math.isfinite(loss0):
            m2 = clone_model(model)
            o2 = clone_optimizer(optimizer, model, m2, fresh=True)
            rt = range_test(m2, o2, loss_fn, batches, device, steps=range_steps,
                            start_lr=min(1e-7, lr / 1e4), end_lr=max(10.0, lr * 100))
            del m2, o2

        # -- 3. precision ---------------------------------------------------------------
        pa = None
        if precision:
            prog.start("precision audit")
        if precision and math.isfinite(loss0):
            m3 = clone_model(model)
            freeze_dropout(m3)
            o3 = clone_optimizer(optimizer, model, m3)
            pa = audit(m3, o3, loss_fn, probe, device)
            del m3, o3

    # -- learning rate verdicts ----------------------------------------------------------
    max_stable = curv.max_stable_lr if curv is not None else math.nan
    cands = []
    if (curv is not None and math.isfinite(max_stable) and max_stable > 0
            and not math.isfinite(calm_lr)):
        # for Adam too: a suggestion above the limit printed beside it is not one to follow
        # (issue #9: a char GPT's suggestion was 29x the preconditioned limit and ruined it).
        # Not when the trial steps blew up (a calm LR was searched for): an adaptive
        # optimizer's limit is then measured on the weights they wrecked (report.limit_note),
        # and a DDPM denoiser at Adam 2.0 read 1.5e-9 and was told "set the learning rate to
        # 7.41e-10"; the calm LR caps the suggestion instead
        cands.append(LIMIT_SAFETY * max_stable)
    # the range test counts only when its loss improved somewhere: a net that cannot learn
    # (a dead layer) has a flat, noisy sweep whose "minimum" suggested lr 1e-8 (issue #13)
    if rt is not None and rt.improved and math.isfinite(rt.lr_diverge):
        cands.append(rt.lr_diverge / RANGE_DIVISOR)
    if (rt is not None and rt.improved and math.isfinite(rt.lr_min_loss)
            and rt.lr_min_loss < rt.lrs[-1] / 2):
        # fastai's "LR at the minimum / 10" (mechanisms §3.6), also when the sweep diverged:
        # an adaptive optimizer's sweep diverges late (Adam's, from fresh moments, ran on to
        # 0.167 on the zoo's curvature_adam_lr_too_high, whose working LR is ~1e-3)
        cands.append(rt.lr_min_loss / 10)
    # lr_cap: the largest LR the measurements call safe. The suggestion lowers an LR above it
    # to it, raises an LR far below it by one notch, and otherwise keeps the user's LR: the
    # doctor never advises a jump it cannot vouch for (issue #9).
    if math.isfinite(calm_lr):
        cands.append(calm_lr)  # the trial steps blew up at this LR and not at this one
    lr_cap = min(cands) if cands else math.nan
    # a structural fault (a dead layer, a vanishing or saturated stack) is not cured by a
    # higher LR, and the curvature and sweep of a network that cannot learn say little: the
    # suggestion never raises the LR beside one (issue #13: a dead first layer got "raise the
    # LR 3x" next to its dead_units finding)
    blocking = next((f for f in findings if f.severity == "error"
                     and f.kind in ("dead_units", "vanishing_gradient", "saturation")), None)
    # nor beside a trial that diverged: what was measured after it, on wrecked weights, says
    # nothing of the room above the LR (a small transformer at Adam 0.3 was told to raise it 3x)
    diverged = any(f.kind in ("divergence", "nonfinite") for f in findings)
    calm_trial = not diverged and (len(losses) < 2 or losses[0] <= 0
                                    or max(losses) <= RAISE_CALM * losses[0])
    too_low = (math.isfinite(lr_cap) and lr < lr_cap / LR_TOO_LOW_FACTOR and calm_trial
               and rt is not None)
    if math.isfinite(lr_cap) and lr > lr_cap:
        suggested = lr_cap
    elif math.isfinite(lr_cap) and lr < lr_cap / LR_TOO_LOW_FACTOR and blocking is None \
            and calm_trial:
        suggested = lr * RAISE_STEP
    else:
        suggested = lr
    warmup = 0
    if curv is not None and math.isfinite(max_stable):
        ratio = lr / max_stable if max_stable > 0 else math.inf
        ev = {"lr": lr, "max_stable_lr": max_stable, "lambda_max": curv.lambda_max,
              "eta_lambda": lr * curv.lambda_max, "threshold": curv.threshold,
              "preconditioned": curv.preconditioned}
        improving = _improving(losses)
        if not curv.preconditioned and ratio > 1:
            if diverged or (ratio > CATAPULT_FACTOR and not improving):
                findings.append(Finding(
                    "lr_too_high", 0, f"lr {lr:.3g} is {ratio:.1f}× the curvature limit "
                    f"{max_stable:.3g} = {curv.threshold:.3g}/λ_max (λ_max {curv.lambda_max:.4g}, "
                    f"{kind})" + (": the trial run diverged" if diverged else
                                  ": the top direction diverges geometrically"),
                    severity="error", evidence=ev))
            else:
                catapult = ratio <= RELU_CATAPULT_FACTOR
                regime = ("catapult / edge-of-stability regime, usually benign (Lewkowycz 2020, "
                          "Cohen 2021)" if catapult else
                          "the loss is not quadratic along the top direction at this step size "
                          "(where it is, the top direction diverges geometrically past "
                          f"{RELU_CATAPULT_FACTOR:g}× the limit; Lewkowycz 2020)")
                findings.append(Finding(
                    "lr_too_high", 0, f"lr {lr:.3g} is {ratio:.1f}× the curvature limit "
                    f"{max_stable:.3g}, but the trial steps still reduce the loss: {regime}",
                    severity="info",
                    evidence={**ev, "regime": "catapult" if catapult else "not_quadratic"}))
                warmup = max(warmup, 100)
        elif curv.preconditioned and ratio > 1 and not diverged and not any(
                f.kind == "lr_too_high" for f in findings):
            # not an error: an adaptive optimizer's preconditioned sharpness settles at its limit
            # while it trains (Cohen 2022); but a suggestion below the LR needs its reason
            findings.append(Finding(
                "lr_too_high", 0, f"lr {lr:.3g} is {ratio:.1f}× {kind}'s preconditioned curvature "
                f"limit {max_stable:.3g} = {curv.threshold:.3g}/λ_max (λ_max {curv.lambda_max:.4g}, "
                "measured after the trial steps): adaptive optimizers often train above the "
                "limit measured early, at the edge of stability, but a run far above it can "
                f"stall; the suggested LR, {suggested:.3g}, stays below it",
                severity="info", evidence={**ev, "regime": "preconditioned"}))
    if rt is not None and math.isfinite(rt.lr_diverge) and lr >= rt.lr_diverge and \
            not any(f.kind == "lr_too_high" and f.severity == "error" for f in findings):
        findings.append(Finding(
            "lr_too_high", 0, f"lr {lr:.3g} is above the LR range test's divergence point "
            f"{rt.lr_diverge:.3g}", severity="error",
            evidence={"lr": lr, "lr_diverge": rt.lr_diverge, "max_stable_lr": max_stable}))
    if too_low and blocking is not None:
        findings.append(Finding("lr_too_low", 0, f"lr {lr:.3g} is far below the largest LR the "
                                f"measurements call safe ({lr_cap:.3g}), but it is kept: "
                                f"{blocking.kind} must be fixed first (a higher LR does not "
                                "revive dead units or restore a vanishing gradient)",
                                severity="info", evidence={"lr": lr, "suggested_lr": suggested,
                                                           "lr_cap": lr_cap,
                                                           "blocked_by": blocking.kind}))
    elif too_low:
        findings.append(Finding("lr_too_low", 0, f"lr {lr:.3g} is over {LR_TOO_LOW_FACTOR:.0f}× below "
                                f"the largest LR the measurements call safe ({lr_cap:.3g}); "
                                f"raise it a notch at a time ({RAISE_STEP:g}x: "
                                f"{suggested:.3g}) and watch the loss", severity="info",
                                evidence={"lr": lr, "suggested_lr": suggested, "lr_cap": lr_cap}))
    if pre and optimizer is not None:
        b2 = float(optimizer.param_groups[0].get("betas", (0.9, 0.999))[1])
        if any(f.kind in ("lr_too_high", "divergence") for f in findings):
            warmup = int(round(2 / (1 - b2)))  # Ma & Yarats 2019 rule of thumb, §3.7
    elif any(f.kind == "lr_too_high" for f in findings) and warmup == 0:
        warmup = 100
    if ns is not None and math.isfinite(ns.eps_opt) and ns.eps_opt > 0 and not pre and optimizer is not None \
            and ns.batch < ns.b_simple and lr > NOISE_LR_FACTOR * ns.eps_opt:
        stalled = not _improving(losses)
        findings.append(Finding(
            "batch_too_small", 0, f"batch {ns.batch} is below the gradient noise scale "
            f"B_simple≈{ns.b_simple:.0f}: the optimal step at this batch is ε_opt≈{ns.eps_opt:.3g}, "
            f"lr {lr:.3g} is {lr / ns.eps_opt:.1f}× that"
            + ("; the trial steps did not reduce the loss" if stalled else
               "; the trial steps still reduce the loss"),
            severity="warning" if stalled else "info",
            evidence=ns.to_dict()))
    if pa is not None:
        over = pa.overflow_layers.get("fp16", [])
        near = [lp.name for lp in pa.layers if lp.name not in over
                and lp.headroom_bits.get("fp16", math.inf) < HEADROOM_WARN_BITS]
        if over:
            findings.append(Finding(
                "precision_overflow", 0, f"{len(over)} layer(s) produce values above fp16's max "
                f"65504 (largest |y| {max(lp.amax for lp in pa.layers if lp.name in over):.3g})",
                where=over[0], locations=tuple(over), severity="warning",
                evidence={"format": "fp16", "amax": {lp.name: lp.amax for lp in pa.layers if lp.name in over}}))
        elif near:
            findings.append(Finding(
                "precision_overflow", 0, f"{len(near)} layer(s) within {HEADROOM_WARN_BITS:g} bits of "
                "fp16's max 65504", where=near[0], locations=tuple(near), severity="info",
                evidence={"format": "fp16", "headroom_bits": {lp.name: lp.headroom_bits["fp16"]
                                                              for lp in pa.layers if lp.name in near}}))
        uf = pa.grad_underflow.get("fp16", 0.0)
        if uf > UNDERFLOW_FRACTION:
            findings.append(Finding(
                "precision_underflow", 0, f"{uf:.1%} of non-zero gradients are below 2^-24 and flush "
                f"to zero in fp16 ({pa.grad_underflow.get('fp16_scaled', 0):.1%} with loss scale 2^16)",
                severity="info", evidence=dict(pa.grad_underflow)))
        sens = [n for n in pa.keep_fp32.get("fp16", []) if n not in over]
        if sens:
            findings.append(Finding(
                "precision_sensitive", 0, f"{len(sens)} layer(s) are too sensitive for fp16 "
                "(own rounding error above 10·√K·u)", where=sens[0], locations=tuple(sens),
                severity="info", evidence={lp.name: lp.sensitivity for lp in pa.layers if lp.name in sens}))
        sw = pa.swamping.get("bf16", math.nan)
        if math.isfinite(sw) and sw > SWAMPING_FRACTION:
            findings.append(Finding(
                "precision_swamping", 0, f"{sw:.0%} of one step's updates would be lost to rounding "
                "with bf16 weights (fp16: "
                f"{pa.swamping.get('fp16', math.nan):.0%})", severity="info", evidence=dict(pa.swamping)))

    clip = float(np.mean(grad_norms)) if grad_norms else None
    ctx: dict[str, Any] = {"lr": lr, "optimizer": kind, "suggested_lr": suggested,
                           "max_stable_lr": max_stable, "warmup_steps": warmup, "clip_norm": clip,
                           "clip_lr": clip_lr,
                           "noise": ns, "residual_blocks": [n for n, _ in residual_blocks(model)],
                           "precision": pa}
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order.get(f.severity, 3))
    rx = prescribe(findings, model, ctx)
    return DoctorReport(findings, rx, max_stable, suggested, warmup, lr, kind,
                        type(model).__name__, layers, curv, rt, ns, pa, losses,
                        time.perf_counter() - t0)


def _improving(losses: list[float]) -> bool:
    """True when the trial losses are finite and the last quarter's mean is below the first
    quarter's."""
    if len(losses) < 4 or not all(math.isfinite(v) for v in losses):
        return False
    q = max(1, len(losses) // 4)
    return float(np.mean(losses[-q:])) < float(np.mean(losses[:q]))


def _blowup(losses: list[float]) -> tuple[float, int] | None:
    """(peak, its trial step) when the trial losses rose above :data:`BLOWUP_FACTOR` times the
    first one and the last is back below :data:`DIVERGE_FACTOR` times it (a transient blow-up);
    None otherwise (a last loss still above is the divergence rule's)."""
    if len(losses) <= 3 or not all(math.isfinite(v) for v in losses) or losses[0] <= 0:
        return None
    peak = max(losses)
    if peak <= BLOWUP_FACTOR * losses[0] or losses[-1] > DIVERGE_FACTOR * losses[0]:
        return None
    return peak, losses.index(peak)


def _calm_lr(model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn: LossFn,
             batches: Any, steps: int, device: torch.device, seed: int, lr: float,
             probe: Any = None) -> tuple[float, list[tuple[float, float]], float]:
    """The trial steps again, from the same start, batches and seed, at the LR (every group's)
    divided by :data:`RAISE_STEP` up to :data:`CALM_TRIES` times: the first LR whose peak loss
    stays within :data:`BLOWUP_FACTOR` times its first loss (NaN when none does), each LR
    tried with its peak over its first loss, and the gradient norm on ``probe`` after the
    calm LR's trial steps (NaN without one): the clip to prescribe, where the blown-up
    trial's own norm is that of wrecked weights (208 on a small transformer at Adam 0.3)."""
    tried: list[tuple[float, float]] = []
    for k in range(1, CALM_TRIES + 1):
        f = RAISE_STEP ** -k
        m = clone_model(model)
        freeze_dropout(m)
        o = clone_optimizer(optimizer, model, m)
        set_lr(o, [_group_lr(g) * f for g in o.param_groups])
        torch.manual_seed(seed)
        ls = train_steps(m, o, loss_fn, batches, steps, device)
        finite = bool(ls) and all(math.isfinite(v) for v in ls)
        ratio = max(ls) / ls[0] if finite and ls[0] > 0 else math.inf
        tried.append((lr * f, ratio))
        if ratio <= BLOWUP_FACTOR:
            gn = _probe_grad_norm(m, loss_fn, probe, device) if probe is not None else math.nan
            return lr * f, tried, gn
        del m, o
    return math.nan, tried, math.nan


def _probe_grad_norm(m: nn.Module, loss_fn: LossFn, probe: Any, device: torch.device) -> float:
    """The norm of all trainable parameters' gradient on ``probe`` (NaN when not finite)."""
    for p in m.parameters():
        p.grad = None
    loss_of(m, loss_fn, probe, device).backward()
    return _take_grad_norm(m)


def _take_grad_norm(m: nn.Module) -> float:
    """The norm of the trainable parameters' gradients (NaN when none, not finite or 0);
    the gradients are dropped."""
    gl = [p.grad.flatten() for p in trainable(m) if p.grad is not None]
    gn = float(torch.linalg.vector_norm(torch.cat(gl))) if gl else math.nan
    for p in m.parameters():
        p.grad = None
    return gn if math.isfinite(gn) and gn > 0 else math.nan


def _group_lr(g: dict) -> float:
    """A parameter group's learning rate as a float (a tensor LR too)."""
    lr = g["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)
