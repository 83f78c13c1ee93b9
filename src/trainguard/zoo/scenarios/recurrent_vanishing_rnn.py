"""Z5, vanishing twin - a vanilla tanh RNN cannot carry the adding problem's first number
across up to 100 steps (Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013).

Setup: the model of ``recurrent_exploding_rnn`` (tanh RNN, 50 hidden units, W_rec = rho * Q,
Q orthogonal, zero biases, linear head on the last state) at rho = 0.9, on the adding
problem at T = 100 (batch 20), Adam lr 1e-2, 600 steps. sigma_max(W_rec) = 0.9 < 1/gamma = 1
is sufficient for vanishing gradients (research/mechanisms.md 2.4): ||dh_T/dh_0||_2 <=
0.9^100 = 2.7e-5, measured 1.4e-5 / 1.5e-5 at init on an adding sequence (seeds 0-1; the
[C] figure of 1.5e-12 in mechanisms.md 2.4 is for random inputs that saturate tanh) and
3e-9 / 3e-6 after training. The first marked value sits 50-99 steps before the last one;
the input gradient reaching step T/2 - 1 is 2e-10 to 2e-2 of the last step's (median 1e-5
over probes every 100 steps, seeds 0-1), so the loss stays at the constant predictor's
Var(sum) = 0.167.
Adam is used (not the exploding twin's SGD): its per-parameter rescaling is the strongest
optimizer-side lever on small gradients and it does not help, and the repaired GRU needs
it to learn within the budget (with SGD lr 0.08 it too stays at 0.167). Clipping cannot
help: there is nothing large to clip.

Criterion: held-out MSE < 0.05 after 600 steps (constant predictor 0.167; remembering only
the second value would give Var(U(0, 1)) = 0.083).
Calibration (seeds 0-4, one thread): bare 0.176 / 0.169 / 0.186 / 0.175 / 0.168 (2.3-3.4 s a
run); repaired with a GRU of the same width (``cell="gru"``, same optimizer and budget;
its gates give an additive path through time) 0.0005 / 0.0011 / 0.0004 / 0.0005 / 0.0004
(~6.7 s a run). The GRU also starts with a vanishing path (input-gradient ratio 1e-10 at
init) but opens it within 100-200 steps (0.02-0.1, then >= 1 once it has learned). An LSTM
of the same width is a repair too but slower: 0.165 at 600 steps, below 0.05 only after
1220-1750 steps (seeds 0-2). Not repairable by the default Guard's remedies (skip, clip,
LR backoff, rollback): the prescription is a gated cell (GRU/LSTM), or an orthogonal W_rec at
rho = 1 with a shorter T. With ``Policy(structural="repair")`` the Guard makes the first swap
itself (remedies/structure.py, ``cell:gru``): at step 150, where the vanishing is recognised,
``rnn`` becomes an ``nn.GRU`` of the same shape, and the run ends at 0.0009 / 0.0014 (seeds
0 / 1; ``trainguard zoo --only recurrent_vanishing_rnn --seeds 2 --structural``).

What the Guard sees (seeds 0-1): ``vanishing_gradient`` in ``rnn`` at step 150, from its
through-time probe (detect/gradients.py): the median of ||dL/dx_0|| / ||dL/dx_T-1|| over
the probes after init is below 1e-4 (measured 7e-8 / 1e-5), while the GRU repair's
probes open to 2e-3 and more by step 100 and the healthy LSTM control never goes below
9e-4. Before that probe existed the Guard saw nothing: its gradient norms are per module, and the vanishing happens inside ``rnn`` (through time), not between
modules: ||grad rnn|| / ||grad head|| has median 0.07-0.10 (min 0.01-0.04), because W_ih and
W_hh get their gradient from the last few steps. The plateau rule stays quiet because the
loss falls from 0.67-0.93 (step 0) to 0.17 within five steps (the head's bias learns the
target mean 1.0) and so is below half its initial value; relaxed to 5%, it would fire
(steps 168-230) but also on the repaired GRU, which waits at 0.17 for 300-450 steps before
it learns, and on the healthy LSTM control. The statistic that separates them is the
backward signal per time step, ||dL/dx_t|| / ||dL/dx_T|| at t = T/2 - 1: vanilla RNN
2e-3 at init, then 2e-10 to 2e-2 (median 1e-5) at steps 100-600; GRU 1e-10 at init, 2e-2 to
4e-2 at step 100 and 0.1 at step 200 (still at loss 0.15-0.16), 1 to 3 from step 300 on.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import Scenario, Setup, register
from ._common_a import below, eval_mse, seed_all
from .healthy_models import SeqRegressor, adding_batch
from .recurrent_rnn import VanillaRNN

T = 100
RHO = 0.9
HIDDEN = 50
LR = 1e-2
THRESHOLD = 0.05


def build(seed: int, cell: str = "rnn", rho: float = RHO) -> Setup:
    """``cell``: "rnn" (the vanilla tanh RNN, W_rec = rho x orthogonal) or "gru"/"lstm"
    (``healthy_models.SeqRegressor`` of the same width, PyTorch's default init)."""
    if cell not in ("rnn", "gru", "lstm"):
        raise ValueError(f"cell must be 'rnn', 'gru' or 'lstm', got {cell!r}")
    g = seed_all(seed)
    model = VanillaRNN(rho, hidden=HIDDEN, g=g) if cell == "rnn" else SeqRegressor(cell, HIDDEN)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    xte, yte = adding_batch(torch.Generator().manual_seed(10_000 + seed), 1000, T)

    def batches():
        while True:
            yield adding_batch(g, 20, T)
    return Setup(model=model, optimizer=opt, batches=batches, loss_fn=nn.functional.mse_loss,
                 steps=600, evaluate=eval_mse(xte, yte))


register(Scenario(
    name="recurrent_vanishing_rnn", category="pathological",
    mechanism=f"vanishing gradients through time: tanh RNN, W_rec = {RHO} x orthogonal "
              f"(sigma_max < 1/gamma), adding problem T = {T}; the loss stays at the "
              "constant predictor",
    expected=("vanishing_gradient", "plateau"),
    source="Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio 2013 (arXiv 1211.5063); "
           "research/mechanisms.md 2.4 and Z5 (vanishing twin)",
    criterion=f"held-out MSE < {THRESHOLD} after 600 steps (constant predictor 0.167)",
    build=build, passed=below(THRESHOLD), repairable_online=False,
    prescription="a gated recurrent cell (GRU or LSTM), or an orthogonal W_rec at rho = 1 "
                 "with a shorter sequence; clipping cannot help (the gradient is tiny)",
    reference=THRESHOLD))
