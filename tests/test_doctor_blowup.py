"""The doctor's trial steps that blow up and come back (an adaptive optimizer): a DDPM denoiser
at Adam 3e-2 went 1.01 -> 24.96 -> 1.19 in its 20 trial steps and was called healthy, though
3 of 4 seeds trained at that LR collapse to predicting zero noise; at 1e-2 the trial is calm
(``doctor._doctor.CALM_TRIES``)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import trainguard as tg
from trainguard.doctor._doctor import _blowup

from test_dead_tails import Denoiser, ddpm_batches  # the DDPM denoiser and its batches

torch.set_num_threads(1)


@pytest.mark.parametrize("losses,expect", [
    ([1.0, 1.02, 5.19, 7.03, 24.97, 3.47, 1.19], (24.97, 4)),  # up 25x and back
    ([1.0, 0.9, 0.8, 0.7, 0.6], None),                         # a descent
    ([1.0, 2.0, 3.9, 1.5, 1.0], (3.9, 2)),                     # above 2.5x, back below 4x
    ([1.0, 2.0, 2.4, 1.5, 1.0], None),                         # within 2.5x its start
    ([1.0, 2.0, 9.0, 12.0, 30.0], None),                       # still up: the divergence rule's
    ([1.0, 9.0, math.inf, 1.0, 1.0], None),                    # not finite: the divergence rule's
    ([1.0, 9.0, 1.0], None),                                   # too few
])
def test_a_transient_blowup_is_a_peak_above_2_5x_the_first_loss_that_came_back(losses, expect):
    assert _blowup(losses) == expect


class Packed(nn.Module):
    """The DDPM denoiser with the timestep packed as the last input column: ``model(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Denoiser()

    def forward(self, z):
        return self.inner(z[:, :-1], z[:, -1])


def _batches(n: int = 16):
    return [(torch.cat([xt, t[:, None].float()], 1), eps)
            for _, (xt, t, eps) in zip(range(n), ddpm_batches())]


def _doctor(lr: float):
    torch.manual_seed(1)
    model = Packed()
    return tg.doctor(model, F.mse_loss, _batches(), torch.optim.Adam(model.parameters(), lr=lr),
                     lr_range=False, precision=False, noise=False, progress=False)


def test_a_denoiser_whose_first_adam_steps_blow_up_is_told_to_lower_its_lr():
    rep = _doctor(0.03)
    f = next(f for f in rep.findings if f.kind == "lr_too_high")
    assert f.severity == "warning" and f.evidence["trigger"] == "trial_blowup"
    assert f.evidence["peak"] > 4 * f.evidence["first_loss"] > 0
    assert f.evidence["calm_lr"] == pytest.approx(0.01)
    assert f.evidence["tried"][0][1] <= 4.0
    assert not rep.healthy
    assert rep.suggested_lr == pytest.approx(0.01)
    first = rep.prescriptions[0]
    assert first.action.startswith("set the learning rate to 0.01 (now 0.03)"), first.action
    assert first.remedy == "lr:0.01"
    assert "blew up" in first.expected


def test_a_trial_that_blows_up_at_every_lr_tried_gets_the_lowest_and_no_clip():
    """Adam 2.0: the trial diverges, and so do its retries at 2/3, 2/9 and 2/27. The limit
    measured after it, on the wrecked weights (1.5e-9), set the suggestion to 7.41e-10, and the
    clip came from the wrecked weights' gradient (3.9e9)."""
    rep = _doctor(2.0)
    f = next(f for f in rep.findings if f.kind == "divergence")
    assert f.evidence["calm_lr"] is None
    assert [round(lr, 4) for lr, _ in f.evidence["tried"]] == [0.6667, 0.2222, 0.0741]
    assert all(peak > 2.5 for _, peak in f.evidence["tried"])
    assert rep.suggested_lr == pytest.approx(2.0 / 27)
    assert rep.max_stable_lr < 1e-6 and rep.limit_note  # printed, with its note
    first = rep.prescriptions[0]
    assert first.action.startswith("set the learning rate to 0.0741 (now 2)"), first.action
    assert "at every lower LR tried too" in first.expected
    assert not any(p.action.startswith("clip the gradient norm") for p in rep.prescriptions)


def test_a_denoiser_at_its_working_lr_is_left_alone():
    rep = _doctor(1e-3)
    assert not any(f.kind == "lr_too_high" for f in rep.findings), rep.findings
    assert rep.suggested_lr == pytest.approx(1e-3)
    assert max(rep.trial_losses) < 4 * rep.trial_losses[0]
    assert not rep.limit_note and "not a guide" not in rep.summary()


def test_sgd_whose_trial_catapults_is_left_to_the_curvature_limit():
    """(S)GD's rise and fall is the catapult (benign between 2/λ and ~4/λ): the zoo's
    ``curvature_catapult`` rises 52x in its trial steps and converges; no trial_blowup."""
    import itertools

    import trainguard.zoo.scenarios  # noqa: F401
    from trainguard.zoo import REGISTRY
    st = REGISTRY["curvature_catapult"].build(0)
    data = list(itertools.islice(st.batches(), 32))
    rep = tg.doctor(st.model, st.loss_fn, data, st.optimizer, lr_range=False, precision=False,
                    noise=False, progress=False)
    assert max(rep.trial_losses) > 4 * rep.trial_losses[0]
    assert not any(f.evidence.get("trigger") == "trial_blowup" for f in rep.findings)


def _zoo_doctor(name: str, **kw):
    import itertools

    import trainguard.zoo.scenarios  # noqa: F401
    from trainguard.zoo import REGISTRY
    st = REGISTRY[name].build(0)
    data = list(itertools.islice(st.batches(), 32))
    return tg.doctor(st.model, st.loss_fn, data, st.optimizer, lr_range=False, precision=False,
                     noise=False, progress=False, **kw)


def test_an_lr_above_adams_preconditioned_limit_is_explained_not_called_an_error():
    """The zoo's transformer at Adam 0.1 (its attention logits grow): the suggestion was below
    the LR with no finding saying why, in a report called healthy (nanoGPT at 100x its LR too);
    now an info names the limit. (A 16-sequence probe keeps the test short.)"""
    rep = _zoo_doctor("transformer_attention_logit_growth", probe_size=16, max_batches=8)
    f = next(f for f in rep.findings if f.kind == "lr_too_high")
    assert f.severity == "info" and f.evidence["regime"] == "preconditioned"
    assert f.evidence["lr"] > f.evidence["max_stable_lr"] > rep.suggested_lr
    assert rep.healthy and rep.warmup_steps > 0
    p = next(p for p in rep.prescriptions if p.finding == "lr_too_high")
    assert p.action.startswith("if the loss stalls or spikes, lower the learning rate toward")
    assert p.remedy == ""  # advice: repair() does not try it


def test_adam_below_its_preconditioned_limit_gets_no_lr_note():
    rep = _zoo_doctor("healthy_mlp_adam")
    assert not any(f.kind == "lr_too_high" for f in rep.findings), rep.findings


def test_a_diverged_adam_trial_is_never_told_to_raise_its_lr():
    """A small transformer at Adam 0.3: its trial diverged (3.6 -> 290), the limit measured after
    it, on the wrecked weights, read 580, and the suggestion raised the LR 3x. Now the trial
    is retried lower, and the first calm LR is suggested."""
    from test_checkpointing import V, Net
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        x = torch.randint(0, V, (8, 16), generator=g)
        data.append((x, torch.roll(x, 1, dims=1)))
    torch.manual_seed(0)
    model = Net(reentrant=False)
    rep = tg.doctor(model, lambda o, y: F.cross_entropy(o.reshape(-1, V), y.reshape(-1)), data,
                    torch.optim.Adam(model.parameters(), lr=0.3), lr_range=False,
                    precision=False, noise=False, progress=False)
    f = next(f for f in rep.findings if f.kind == "divergence")
    assert rep.max_stable_lr > 100  # measured on the wrecked weights (580): not followed
    assert f.evidence["calm_lr"] == pytest.approx(0.1)
    assert rep.suggested_lr == pytest.approx(0.1)
    assert not any(f.kind == "lr_too_low" for f in rep.findings)
    assert "the trial steps at 0.1 peak at" in rep.prescriptions[0].expected
    # the summary still prints that limit (580), and says it is no guide
    assert "[measured after trial steps that blew up: not a guide]" in rep.summary()
    # the clip is measured after the calm trial, not on the wrecked weights (208)
    clip = next(p for p in rep.prescriptions if p.action.startswith("clip the gradient norm"))
    assert "after the trial steps at lr 0.1, which stayed calm" in clip.action
    assert float(clip.action.split(" at ")[1].split()[0]) < 50, clip.action


def test_a_trial_that_rose_is_not_told_to_raise_its_lr():
    """The DDPM denoiser at Adam 2e-2 (seed 1): the trial rose 3.6x and came back, the limit
    measured after it read 66, and the doctor suggested 6e-2, at which the run collapses."""
    rep = _doctor(0.02)
    assert rep.suggested_lr < 0.02
    assert any(f.evidence.get("trigger") == "trial_blowup" for f in rep.findings)
