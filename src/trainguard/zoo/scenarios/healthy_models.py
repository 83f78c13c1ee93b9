"""Healthy controls beyond the digits MLP: regression, a CNN, an LSTM and a tiny Transformer.

Each is an ordinary, well-configured run that must pass its criterion bare while the Guard
stays silent (no severe finding, no skip/rollback/lr_backoff/halt).
"""
from __future__ import annotations

import inspect
import math
from functools import lru_cache

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_a import below, digits, eval_ce, eval_mse, minibatches, mlp, seed_all

SOURCE = "healthy control (research/mechanisms.md section 0: benign signals must stay quiet)"


# ----------------------------------------------------------------------------- linear regression
def build_linear(seed: int) -> Setup:
    """y = X w* + noise (sd 0.1), 20 features, 512 samples; full-batch GD at eta = 1/lambda_max
    with lambda_max = top eigenvalue of the Hessian 2 X^T X / n (descent lemma: any eta < 2/lambda
    converges, mechanisms.md 3.1)."""
    g = seed_all(seed)
    n, d = 512, 20
    x = torch.randn(n, d, generator=g) * torch.linspace(0.3, 3.0, d)  # condition number ~100
    w = torch.randn(d, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
    model = nn.Linear(d, 1)
    lam = float(torch.linalg.eigvalsh(2 * (x.T @ x) / n).max())
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / lam)
    return Setup(model=model, optimizer=opt, batches=minibatches(x, y, n, seed),
                 loss_fn=nn.functional.mse_loss, steps=500, evaluate=eval_mse(x, y))


register(Scenario(
    name="healthy_linear_gd", category="healthy",
    mechanism="linear regression (20 features, condition number ~100), full-batch GD at 1/lambda_max",
    expected=(), source=SOURCE + "; Cohen 2021 stability bound eta < 2/lambda",
    criterion="training MSE < 0.05 (noise variance 0.01)", build=build_linear,
    passed=below(0.05), fast=True, reference=0.05))


# ----------------------------------------------------------------------------- MLP regressor
def build_regressor(seed: int) -> Setup:
    """Friedman #1 (scikit-learn's generator: 10 inputs, 5 used, noise sd 1) regression with a
    64-64 ReLU MLP and Adam; targets standardised so the constant predictor scores 1.0."""
    from sklearn.datasets import make_friedman1
    seed_all(seed)
    x, y = make_friedman1(n_samples=1200, n_features=10, noise=1.0, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    y = (y - y[:1000].mean()) / y[:1000].std()
    model = mlp([10, 64, 64, 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model=model, optimizer=opt, batches=minibatches(x[:1000], y[:1000], 32, seed),
                 loss_fn=nn.functional.mse_loss, steps=800,
                 evaluate=eval_mse(x[1000:], y[1000:]))


register(Scenario(
    name="healthy_mlp_regressor", category="healthy",
    mechanism="MLP 10-64-64-1 regressor (Friedman #1, standardised targets), Adam lr 3e-3",
    expected=(), source=SOURCE, criterion="held-out MSE < 0.2 (constant predictor: 1.0)",
    build=build_regressor, passed=below(0.2), reference=0.2))


# ----------------------------------------------------------------------------- CNN
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
        self.c2, self.a2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = self.a1(self.c1(x))
        x = self.pool(self.a2(self.c2(x)))
        return self.fc(x.flatten(1))


def build_cnn(seed: int) -> Setup:
    seed_all(seed)
    xtr, ytr, xte, yte = digits()
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return Setup(model=model, optimizer=opt, batches=minibatches(xtr, ytr, 32, seed),
                 loss_fn=nn.functional.cross_entropy, steps=400, evaluate=eval_ce(xte, yte))


register(Scenario(
    name="healthy_cnn", category="healthy",
    mechanism="CNN conv16-conv32-pool-fc on 8x8 digits, SGD momentum 0.9 lr 0.02",
    expected=(), source=SOURCE, criterion="held-out cross-entropy < 0.35",
    build=build_cnn, passed=below(0.35), fast=True, reference=0.35))


# ----------------------------------------------------------------------------- LSTM
T_ADD = 15


def adding_batch(g: torch.Generator, batch: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem (Hochreiter & Schmidhuber 1997; Pascanu 2013): channel 0 holds
    U(0, 1) values, channel 1 marks two positions (one in each half); the target is the sum of
    the two marked values. The constant predictor's MSE is Var(sum) = 2/12 = 0.167."""
    vals = torch.rand(batch, t, generator=g)
    marks = torch.zeros(batch, t)
    i = torch.randint(0, t // 2, (batch,), generator=g)
    j = torch.randint(t // 2, t, (batch,), generator=g)
    marks[torch.arange(batch), i] = 1.0
    marks[torch.arange(batch), j] = 1.0
    x = torch.stack([vals, marks], dim=-1)
    y = (vals * marks).sum(1, keepdim=True)
    return x, y


class SeqRegressor(nn.Module):
    def __init__(self, cell: str = "lstm", hidden: int = 32) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def build_lstm(seed: int) -> Setup:
    g = seed_all(seed)
    model = SeqRegressor("lstm")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xte, yte = adding_batch(torch.Generator().manual_seed(10_000 + seed), 1000, T_ADD)

    def batches():
        while True:
            yield adding_batch(g, 64, T_ADD)
    return Setup(model=model, optimizer=opt, batches=batches, loss_fn=nn.functional.mse_loss,
                 steps=700, evaluate=eval_mse(xte, yte))


register(Scenario(
    name="healthy_lstm_adding", category="healthy",
    mechanism=f"LSTM (32 units) on the adding problem, T = {T_ADD}, Adam lr 1e-2",
    expected=(), source=SOURCE + "; Hochreiter & Schmidhuber 1997 adding problem",
    criterion="held-out MSE < 0.05 (constant predictor: 0.167)",
    build=build_lstm, passed=below(0.05), reference=0.05))


# ----------------------------------------------------------------------------- char transformer
@lru_cache(maxsize=1)
def _chars() -> tuple[torch.Tensor, int]:
    """Text already on the machine: the source of the standard library's ``argparse``;
    characters outside the 63 most frequent map to one 'other' id."""
    import argparse
    text = inspect.getsource(argparse)
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    keep = sorted(sorted(counts, key=lambda c: -counts[c])[:63])
    idx = {c: i for i, c in enumerate(keep)}
    return torch.tensor([idx.get(c, 63) for c in text], dtype=torch.long), 64


class TinyLM(nn.Module):
    """Pre-LN decoder: 2 layers, d = 64, 4 heads, context 32, learned positions."""

    def __init__(self, vocab: int, d: int = 64, ctx: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        h = self.body(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build_transformer(seed: int) -> Setup:
    g = seed_all(seed)
    ids, vocab = _chars()
    ctx, cut = 32, int(0.9 * len(ids))
    model = TinyLM(vocab, ctx=ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    ge = torch.Generator().manual_seed(1234)
    st = torch.randint(cut, len(ids) - ctx - 1, (128,), generator=ge).tolist()
    xte = torch.stack([ids[s:s + ctx] for s in st])
    yte = torch.stack([ids[s + 1:s + ctx + 1] for s in st])

    def batches():
        while True:
            s = torch.randint(0, cut - ctx - 1, (32,), generator=g).tolist()
            yield (torch.stack([ids[i:i + ctx] for i in s]),
                   torch.stack([ids[i + 1:i + ctx + 1] for i in s]))

    def ev(m: nn.Module) -> float:
        v = float(_lm_loss(m(xte), yte))
        return v if math.isfinite(v) else math.inf
    return Setup(model=model, optimizer=opt, batches=batches, loss_fn=_lm_loss, steps=300,
                 evaluate=ev, scheduler=sched)


def _lm_passed(r: RunResult) -> bool:
    return r.finished and not r.nonfinite and r.metric < 2.0


register(Scenario(
    name="healthy_char_transformer", category="healthy",
    mechanism="pre-LN 2-layer Transformer character LM on argparse's source, AdamW 3e-3, "
              "50-step warmup",
    expected=(), source=SOURCE + "; pre-LN + warmup (Xiong 2020; Goyal 2017)",
    criterion="held-out cross-entropy < 2.0 nats/char (unigram ~3.4)",
    build=build_transformer, passed=_lm_passed, reference=2.0))
