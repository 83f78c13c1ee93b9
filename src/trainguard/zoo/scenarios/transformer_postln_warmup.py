"""Z11 - a post-LN Transformer trained with Adam at a high LR and no warmup (Liu et al. 2019,
RAdam; Xiong et al. 2020; Goyal et al. 2017).

In a post-LN block (x <- LN(x + f(x))) every layer normalisation sits on the residual path,
so the gradients of the lower layers pass through all of them and the effect of an update on
the output is amplified with depth. With Adam (beta2 = 0.999, whose second-moment estimate is
built from only a few samples in the first steps) at a high LR and no warmup, the 4-layer model
below collapses (seeds 0 and 1) within the first ~150 steps onto the unigram plateau (loss ~2.9, the model predicts the
character frequencies and ignores its context) and never leaves it within the budget
(research/mechanisms.md section 3.7 and Z11).

Setup: 4-layer post-LN decoder, d = 64, 4 heads, learned positions, character LM on the source
of two stdlib modules (vocab 64, seq 64, batch 16); Adam lr 1.2e-2, betas (0.9, 0.999),
eps 1e-8, no warmup, no clipping; 400 steps. ``build(seed, pre_ln=True)`` is the repaired
configuration (same LR, pre-LN blocks plus a final LayerNorm); ``warmup`` (linear, in steps)
and ``beta2`` are there for the other repairs.

Criterion: held-out loss < THRESHOLD = 2.0.

Calibration (torch 2.x, CPU, one thread; held-out loss after 400 steps, seeds 0 / 1 / 2):

====================================  ====================  ========
configuration                         held-out loss         verdict
====================================  ====================  ========
post-LN, no warmup (bare)             2.92 / 2.94 / 2.27    fail
post-LN, linear warmup 100 steps      2.13 / 2.10 / 2.12    fail
pre-LN, no warmup (repaired)          1.48 / 1.48 / 1.50    pass
post-LN, no warmup, lr 3e-3           1.39 (seed 0)         pass
====================================  ====================  ========

Seeds 0 and 1 collapse onto the unigram plateau; seed 2 escapes it but stays far above the
pre-LN run. At this toy scale a 100-step warmup avoids the collapse but does not close the
gap at this LR (post-LN's usable LR is simply lower: at 1.5e-2 the warmed-up run collapses
once the LR reaches its peak), and beta2 = 0.98 alone does not help at 1.5e-2-2e-2 either; the
repair that passes at the same LR is pre-LN.

Guard (``tg.Guard`` with defaults, seeds 0 / 1 / 2): seed 0 - grad_explosion at steps 69, 71,
plateau at 152 (then vanishing_gradient from step 237, a consequence of the collapse); seed 1 -
grad_explosion at 115, 171, 215, plateau at 232; seed 2 - no finding (four clips). Its clipping
does not rescue the run (held-out 2.92 / 2.75 / 2.18, all still failing), hence
``repairable_online=False``; on the pre-LN run it finds nothing. With
``tg.Policy(structural="repair")`` the plateau after the explosion is a collapse: the model is
re-initialised and the LR cut to 1/4 for good (``restart:lr``, at steps 138 / 201 on seeds 0 /
1; held-out 1.63 / 1.76, both passing: ``trainguard zoo --only transformer_postln_warmup
--seeds 2 --no-baselines --structural``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import char_data, finite_run, lm_batches, lm_eval_batch, lm_loss, seed_all

THRESHOLD = 2.0
SEQ = 64
LR = 1.2e-2
STEPS = 400


class Block(nn.Module):
    """A Transformer block with causal self-attention; ``post_ln`` picks the placement of the
    layer norms (post-LN: x <- LN(x + f(x)); pre-LN: x <- x + f(LN(x)))."""

    def __init__(self, d: int, heads: int, post_ln: bool) -> None:
        super().__init__()
        self.heads, self.post_ln = heads, post_ln
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.ff(x))
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class LM(nn.Module):
    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 4, seq: int = SEQ,
                 post_ln: bool = True, head_bias: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, post_ln) for _ in range(layers))
        # post-LN already ends in a LayerNorm; pre-LN needs a final one
        self.ln_f = nn.Identity() if post_ln else nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=head_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


def build(seed: int, pre_ln: bool = False, warmup: int = 0, beta2: float = 0.999,
          lr: float = LR) -> Setup:
    seed_all(seed)
    ids, vocab = char_data()
    split = int(len(ids) * 0.9)
    xe, ye = lm_eval_batch(ids, split, len(ids), 64, SEQ)
    model = LM(vocab, post_ln=not pre_ln)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, beta2), eps=1e-8)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
             if warmup else None)

    def evaluate(m: nn.Module) -> float:
        v = float(lm_loss(m(xe), ye))
        return v if math.isfinite(v) else math.inf

    return Setup(model=model, optimizer=opt, batches=lm_batches(ids, 16, SEQ, seed, 0, split),
                 loss_fn=lm_loss, steps=STEPS, evaluate=evaluate, scheduler=sched)


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="transformer_postln_warmup", category="pathological",
    mechanism="post-LN Transformer trained with Adam (beta2 0.999) at a high LR without warmup: "
              "early instability collapses it onto the unigram plateau and it stays there",
    expected=("grad_explosion", "plateau"),
    source="Liu et al. 2019 (RAdam, arXiv 1908.03265); Xiong et al. 2020 (arXiv 2002.04745); "
           "Goyal et al. 2017 (arXiv 1706.02677); research/mechanisms.md sections 3.7 and Z11",
    criterion=f"held-out character loss < {THRESHOLD} after {STEPS} steps at lr {LR} "
              "(pre-LN at the same LR passes)",
    build=build, passed=passed, repairable_online=False,
    prescription="use pre-LN blocks (LayerNorm inside the residual branch plus a final "
                 "LayerNorm); otherwise add a linear LR warmup (~2/(1-beta2) steps) and lower "
                 "the peak LR, or use RAdam",
))
