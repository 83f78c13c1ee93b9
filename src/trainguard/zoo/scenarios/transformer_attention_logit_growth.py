"""Z12 - attention-logit growth in a tiny pre-LN decoder (Wortsman et al. 2023; Dehghani et
al. 2023).

At a high learning rate the query/key weights grow until the attention logits q.k/sqrt(d)
reach the thousands: the softmax saturates to one-hot (attention entropy -> 0), gradients
through it vanish, and the loss stalls far above what the same model reaches with
qk-layernorm (research/mechanisms.md sections 5.1, 5.2, Z12). Calibration (seeds 0-1,
300 steps): max |q.k|/sqrt(d) ~1e5 without qk-norm vs ~20 with it.

Setup: 2-layer pre-LN decoder, d = 64, 4 heads, no biases, learned positions, character LM
on the source of two stdlib modules (vocab 64, seq 64, batch 16); AdamW lr 0.1, betas
(0.9, 0.95), eps 1e-8, no weight decay, global-norm clipping at 1.0 (Wortsman's recipe at the
top of their LR sweep); 300 steps.
Criterion: held-out loss < THRESHOLD. Calibration (seeds 0-1): without qk-norm 2.62-2.65,
with qk-layernorm 2.07-2.13 (at lr 3e-3 both reach ~1.75-1.8).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import char_data, finite_run, lm_batches, lm_eval_batch, lm_loss, seed_all

THRESHOLD = 2.4
SEQ = 64


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(),
                                nn.Linear(4 * d, d, bias=False))
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_ln, self.k_ln = nn.LayerNorm(d // heads), nn.LayerNorm(d // heads)
        self.max_logit = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.qk_norm:
            q, k = self.q_ln(q), self.k_ln(k)
        a = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        self.max_logit = float(a.detach().abs().max())
        a = a.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        y = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.ff(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2,
                 seq: int = SEQ, qk_norm: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, qk_norm) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


def build(seed: int, qk_norm: bool = False, lr: float = 0.1) -> Setup:
    seed_all(seed)
    ids, vocab = char_data()
    split = int(len(ids) * 0.9)
    xe, ye = lm_eval_batch(ids, split, len(ids), 64, SEQ)
    model = TinyLM(vocab, qk_norm=qk_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)

    def evaluate(m: nn.Module) -> float:
        v = float(lm_loss(m(xe), ye))
        return v if math.isfinite(v) else math.inf

    return Setup(model=model, optimizer=opt, batches=lm_batches(ids, 16, SEQ, seed, 0, split),
                 loss_fn=lm_loss, steps=300, evaluate=evaluate,
                 guard_kwargs={"clip": 1.0})


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="transformer_attention_logit_growth", category="pathological",
    mechanism="attention logits grow without bound at high LR (no qk-norm): the attention "
              "softmax saturates to one-hot and the loss stalls high",
    # the growth is driven by the LR: since issue #9 the Guard sees the loss ruined at step 3
    # (divergence, cause learning_rate), cuts the LR 10x and the run passes guarded (seeds 0-1)
    expected=("saturation", "divergence"),
    source="Wortsman et al. 2023 (arXiv 2309.14322); Dehghani et al. 2023 (arXiv "
           "2302.05442); research/mechanisms.md sections 5.1, 5.2 and Z12",
    criterion=f"held-out character loss < {THRESHOLD} after 300 steps (qk-layernorm passes)",
    build=build, passed=passed, repairable_online=False,
    prescription="add qk-layernorm (LayerNorm/RMSNorm on queries and keys per head) or "
                 "soft-cap the attention logits; or lower the learning rate",
))
