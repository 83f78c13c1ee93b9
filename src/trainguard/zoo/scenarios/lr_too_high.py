"""The commonest real failure: a learning rate too high for a real model (issue #9).

Language models and recurrent nets like the ones people train, ruined by a learning rate 20-100x
their working one, without any NaN: the cross-entropy jumps 1-14 nats above its starting
level (ln V) within the first few updates, then settles for good at a ruined level (the
unigram level for the GPT, tens of nats for the LSTM). Each has a healthy twin at its working
learning rate, which the Guard must leave alone.

* ``lr_gpt_too_high``: a nanoGPT-style character GPT (pre-LN, 2 layers, d = 64, 4 heads,
  context 64, learned positions, final LayerNorm; AdamW betas (0.9, 0.99), weight decay 0.1,
  no warm-up, no clipping; 93 symbols of Python's own ``textwrap`` and ``argparse`` sources,
  batch 16) at lr 0.3, 100x its working 3e-3.
* ``lr_gpt_jump``: the same GPT at its working lr 3e-3 whose schedule multiplies the LR by 100
  from step 150 on (a schedule bug, a resumed run with the wrong LR).
* ``lr_lstm_lm_sgd_too_high``: the word-level LSTM language model of the PyTorch examples
  (embedding 64, one LSTM layer of 64, linear decoder, uniform(-0.1, 0.1) init; 523 tokens of
  the same sources, batch 20 x 35) with plain SGD at lr 100, without the example's
  ``clip_grad_norm_(0.25)``; its working LR without clipping is 5.
* ``lr_relu_rnn_early_explosion``: a ReLU RNN with identity recurrent weights (IRNN, Le et al.
  2015; 64 units) on the adding problem (T = 30, batch 20) with SGD lr 0.01: the gradient norm
  goes from 92 at step 0 to 1.2e7 at step 1, the update kills the units and the loss sits at
  ~100-10,000 (or overflows). Clipping that one step (to twice the earlier norm) rescues it;
  the working LR without clipping is 1e-3. 200 steps: a ruined net decays back towards the
  constant predictor (0.167, which passes) by itself over a few hundred steps on some seeds;
  at 200 steps bare fails on seeds 0-2 (inf, 3.34, 0.27) and passes on seed 3 (0.175).

Calibration (torch 2.13, CPU, one thread, seed 0; held-out loss after the run; seconds per run
on a 2-core machine):

==========================  ===============  ================  =======================  ====
scenario                    bare             healthy twin      guarded (this version)   s
==========================  ===============  ================  =======================  ====
lr_gpt_too_high             2.87             1.78 (lr 3e-3)    2.02 (rollback, LR x0.1)  8
lr_gpt_jump (onset 150)     2.65             1.78              1.95 (rollback, LR x0.1)  8
lr_lstm_lm_sgd_too_high     35.8             2.52 (lr 5)       2.56 (rollback, LR x0.1)  5
lr_relu_rnn_early_explosion inf (seed 0)     0.162 (lr 1e-3)   0.171 (clip at step 1)    1
==========================  ===============  ================  =======================  ====

(The GPT numbers were measured with 64 symbols; see docs/zoo.md for the scored run with 93.)
Before issue #9 the Guard found nothing on the GPT at 100x its LR, a ``plateau`` that advised
raising the LR on the LSTM (and a ``vanishing_gradient`` in its embedding), and only a clip
on the LR jump.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_a import below, eval_mse
from ._common_b import char_data, finite_run, lm_batches, lm_eval_batch, lm_loss, seed_all
from .healthy_models import adding_batch
from .transformer_output_logit_divergence import word_data
from .transformer_postln_warmup import LM

GPT_LR = 3e-3
GPT_STEPS = 300
GPT_SEQ = 64
GPT_THRESHOLD = 2.2
LSTM_LR = 5.0
LSTM_STEPS = 400
LSTM_THRESHOLD = 3.0
RNN_T = 30
RNN_LR = 1e-3
RNN_STEPS = 200
RNN_THRESHOLD = 0.25
SOURCE = "issue #9 (a learning rate too high, tried in nanoGPT, the PyTorch word LM, HF, Lightning)"


def _held_out(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    v = float(lm_loss(model(x), y))
    return v if math.isfinite(v) else math.inf


def build_gpt(seed: int, lr: float = GPT_LR, jump_at: int | None = None, jump: float = 100.0) -> Setup:
    """The character GPT at ``lr``; with ``jump_at`` the LR is multiplied by ``jump`` from that
    step on (through a LambdaLR schedule, which the Guard's backoff cooperates with)."""
    seed_all(seed)
    ids, vocab = char_data(128)
    split = int(len(ids) * 0.9)
    xe, ye = lm_eval_batch(ids, split, len(ids), 64, GPT_SEQ)
    model = LM(vocab, d=64, heads=4, layers=2, seq=GPT_SEQ, post_ln=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    sched = None
    if jump_at is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: jump if s >= jump_at else 1.0)
    return Setup(model=model, optimizer=opt, batches=lm_batches(ids, 16, GPT_SEQ, seed, 0, split),
                 loss_fn=lm_loss, steps=GPT_STEPS, evaluate=lambda m: _held_out(m, xe, ye),
                 scheduler=sched)


class WordLSTM(nn.Module):
    """The PyTorch examples' word_language_model (LSTM flavour), small."""

    def __init__(self, vocab: int, d: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.encoder(x))
        return self.decoder(out)


def build_lstm(seed: int, lr: float = LSTM_LR) -> Setup:
    seed_all(seed)
    ids, vocab = word_data()
    split = int(len(ids) * 0.9)
    xe, ye = lm_eval_batch(ids, split, len(ids), 64, 35)
    model = WordLSTM(vocab)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Setup(model=model, optimizer=opt, batches=lm_batches(ids, 20, 35, seed, 0, split),
                 loss_fn=lm_loss, steps=LSTM_STEPS, evaluate=lambda m: _held_out(m, xe, ye))


class IRNN(nn.Module):
    """ReLU RNN with identity recurrent weights and zero biases (Le, Jaitly & Hinton 2015)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(hidden, 1)
        params = dict(self.rnn.named_parameters())
        nn.init.eye_(params["weight_hh_l0"])
        nn.init.zeros_(params["bias_hh_l0"])
        nn.init.zeros_(params["bias_ih_l0"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def build_irnn(seed: int, lr: float = RNN_LR) -> Setup:
    g = seed_all(seed)
    model = IRNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    xte, yte = adding_batch(torch.Generator().manual_seed(10_000 + seed), 1000, RNN_T)

    def batches():
        while True:
            yield adding_batch(g, 20, RNN_T)
    return Setup(model=model, optimizer=opt, batches=batches, loss_fn=nn.functional.mse_loss,
                 steps=RNN_STEPS, evaluate=eval_mse(xte, yte))


def _lm_below(threshold: float):
    def passed(r: RunResult) -> bool:
        return finite_run(r) and r.metric < threshold
    return passed


GPT_MECH = ("character GPT (pre-LN, 2 layers, d 64, 93 symbols), AdamW, no warm-up, no clipping")

register(Scenario(
    name="lr_gpt_too_high", category="pathological",
    mechanism=f"{GPT_MECH}, at lr {100 * GPT_LR:g} (100x its working LR): the loss jumps 1-14 "
              "nats above ln V in the first steps, then settles at the unigram level",
    expected=("divergence",), source=SOURCE + "; Karpathy's nanoGPT shakespeare_char setup",
    criterion=f"held-out loss < {GPT_THRESHOLD} nats/char after {GPT_STEPS} steps "
              f"(working LR: 1.78)",
    build=lambda seed: build_gpt(seed, lr=100 * GPT_LR), passed=_lm_below(GPT_THRESHOLD),
    repairable_online=True, fast=True, onset=0, reference=GPT_THRESHOLD))

register(Scenario(
    name="lr_gpt_jump", category="pathological",
    mechanism=f"{GPT_MECH}, lr {GPT_LR:g} multiplied by 100 from step 150 on (a schedule bug)",
    expected=("divergence", "loss_spike"), source=SOURCE,
    criterion=f"held-out loss < {GPT_THRESHOLD} nats/char after {GPT_STEPS} steps",
    build=lambda seed: build_gpt(seed, jump_at=150), passed=_lm_below(GPT_THRESHOLD),
    repairable_online=True, onset=150, reference=GPT_THRESHOLD))

register(Scenario(
    name="healthy_gpt_no_warmup", category="healthy",
    mechanism=f"{GPT_MECH}, at its working lr {GPT_LR:g}",
    expected=(), source=SOURCE + " (healthy twin)",
    criterion=f"held-out loss < {GPT_THRESHOLD} nats/char after {GPT_STEPS} steps",
    build=build_gpt, passed=_lm_below(GPT_THRESHOLD), reference=GPT_THRESHOLD))

register(Scenario(
    name="lr_lstm_lm_sgd_too_high", category="pathological",
    mechanism="word-level LSTM LM of the PyTorch examples (523 tokens) with SGD lr 100 and no "
              "clipping: the loss jumps from 6.3 to 140-290 and stays at 30-100",
    expected=("divergence",),
    source=SOURCE + "; pytorch/examples word_language_model (SGD lr 20 with clip 0.25)",
    criterion=f"held-out loss < {LSTM_THRESHOLD} nats/token after {LSTM_STEPS} steps "
              f"(working lr {LSTM_LR:g} without clipping: 2.52)",
    build=lambda seed: build_lstm(seed, lr=100.0), passed=_lm_below(LSTM_THRESHOLD),
    repairable_online=True, onset=0, reference=LSTM_THRESHOLD))

register(Scenario(
    name="healthy_lstm_lm_sgd", category="healthy",
    mechanism=f"word-level LSTM LM (523 tokens), SGD at its working lr {LSTM_LR:g}, no clipping",
    expected=(), source=SOURCE + " (healthy twin)",
    criterion=f"held-out loss < {LSTM_THRESHOLD} nats/token after {LSTM_STEPS} steps",
    build=build_lstm, passed=_lm_below(LSTM_THRESHOLD), reference=LSTM_THRESHOLD))

register(Scenario(
    name="lr_relu_rnn_early_explosion", category="pathological",
    mechanism=f"ReLU RNN with identity recurrent weights (IRNN), adding problem T = {RNN_T}, "
              f"SGD lr {10 * RNN_LR:g}: the gradient norm jumps 1e5x at step 1",
    expected=("grad_explosion", "nonfinite", "divergence"),
    source="Le, Jaitly & Hinton 2015 (arXiv 1504.00941); Pascanu et al. 2013 (clipping); " + SOURCE,
    criterion=f"finite, held-out MSE < {RNN_THRESHOLD} after {RNN_STEPS} steps "
              "(constant predictor 0.167)",
    build=lambda seed: build_irnn(seed, lr=10 * RNN_LR), passed=below(RNN_THRESHOLD),
    repairable_online=True, fast=True, onset=0, reference=RNN_THRESHOLD))

register(Scenario(
    name="healthy_irnn", category="healthy",
    mechanism=f"ReLU RNN with identity recurrent weights, adding problem T = {RNN_T}, "
              f"SGD at its working lr {RNN_LR:g}",
    expected=(), source="Le, Jaitly & Hinton 2015 (healthy twin)",
    criterion=f"finite, held-out MSE < {RNN_THRESHOLD} after {RNN_STEPS} steps",
    build=build_irnn, passed=below(RNN_THRESHOLD), reference=RNN_THRESHOLD))
