"""Z13 - output-logit divergence (Wortsman et al. 2023; PaLM's z-loss, Chowdhery et al. 2022).

The softmax is invariant to adding one constant to all logits, so nothing in the loss holds
the normaliser log Z = logsumexp(logits) in place. Adam does not respect that invariance: it
normalises every coordinate separately, and the gradient of a token that is absent from most
batches is a small push down on almost every step and a large push up on the few steps where
the token occurs; after per-coordinate normalisation the two no longer cancel, and (in these
runs, as in Wortsman's) the net effect is that the logits drift down together, linearly in the
number of steps and faster at a higher LR (up to the LR where the model stops learning), with
no weight decay to stop them: "the logits diverge and become very negative" (Wortsman et al.
section 3.2; research/mechanisms.md sections 5.1 and Z13). In fp32 a common offset is
harmless; in bf16 (the precision PaLM and Wortsman train in) a logit carries 8 significant
bits, so at |logit| ~ 256-512 logits are rounded to multiples of 2 and the differences between
them, which are all the softmax sees, are blurred. z-loss (1e-4 * log^2 Z) gives the common
mode the restoring force the loss lacks.

CPU-scale compromises (each needed to get a drift of hundreds within ~20 s): (1) large models
drift through the mean hidden direction (the anisotropic output embeddings of Stollenwerk et
al. 2026); a model this small does not (without an output bias log Z stays within +-10 here,
also at lr 0.15-0.3), so the output layer has a bias, which carries the same drift; (2) the
batch is one sequence of 16 tokens, so that most of the vocabulary is absent from every
batch, as the long tail of a 32k vocabulary is at scale (with 64 tokens a step the drift is
~2x slower); (3) bf16 is emulated by rounding the output layer's logits to torch.bfloat16
(``logits.to(torch.bfloat16)``) in the forward pass - the rounding a bf16 matmul's output
undergoes - with the rest of the model in fp32; gradients pass the rounding unchanged, as
under autocast. Side effect of (1)+(2): Adam also pushes the rare tokens' own logits down
(a per-token, not common, drift), which costs ~0.5 nats of held-out loss in fp32 (2.9-3.3
without the output bias) that z-loss does not repair; the criterion therefore isolates the
precision part. Tokens that occur fewer than MIN_COUNT times are spelled out in characters:
with whole-word tokens down to single occurrences (vocab 1467) the same side effect puts the
model above the unigram loss.

Setup: word-level LM on the source of two stdlib modules (words, punctuation, newlines and
runs of spaces occurring >= MIN_COUNT times are tokens, rarer words are spelled out: 51.8k
tokens, vocab 523, unigram cross-entropy 4.18 nats on the held-out last 10%), 1-layer pre-LN
decoder, d = 32, 4 heads, qk-layernorm (Wortsman's default, which rules out attention-logit
growth, Z12), learned positions, final LayerNorm, output layer with bias, logits rounded to
bf16; Adam lr LR, betas (0.9, 0.95), eps 1e-8, no weight decay, no clipping; batch 1 x 16
tokens; STEPS steps. ``build(seed, z_loss=1e-4)`` is the repaired configuration;
``weight_decay`` (AdamW, decoupled) and ``logits_dtype=torch.float32`` are the other repairs.

Criterion (metric): the bf16 precision penalty on held-out text - the held-out loss with the
logits in the run's precision minus the held-out loss of the same model with fp32 logits -
must stay below THRESHOLD nats: what the model loses only because its logits drifted out of
the range bf16 resolves. (For ``logits_dtype=torch.float32`` it is 0 by construction.)

Calibration (torch 2.13, CPU, one thread, STEPS steps; log Z = mean held-out logsumexp of the
fp32 logits; loss = held-out loss with bf16 logits; seconds per run on a 2-core machine):

===============================  ========================  ============  ============  =====
configuration (seeds 0/1/2/3/4)  penalty (metric, nats)    log Z         loss          s
===============================  ========================  ============  ============  =====
bare (bf16 logits)               .211/.249/.069/.243/.099  -431...-314   3.67...4.05   20-23
z-loss 1e-4 (repaired)           .002/.001/.001/.002/.010  -53...-17     3.56...4.05   24-25
AdamW weight decay 0.1 (seed 0)  .000                      +4.4          3.88          20.5
fp32 logits (seed 0)             .000 (by construction)    -408          3.70 (fp32)   21.7
===============================  ========================  ============  ============  =====

The drift is linear from the start: held-out log Z at steps 2k/6k/10k/14k/18k is
-15/-93/-227/-315/-431 (seed 0) and -9/-103/-215/-318/-426 (seed 1), while the z-loss runs
stay between -16 and -65; the penalty is 0.00/0.015/0.07/0.09/0.21 (seed 0), so it crosses
THRESHOLD at ~8k-10k steps, the late loss rise Wortsman describes. max |logit| on held-out
text: bare 520-760, z-loss 140-190, weight decay 11.

Guard (``tg.Guard`` defaults, seeds 0 / 1): plateau (info) from step 287 / 194, loss_spike
(warning) from step 1056 / 1594 (11 / 7 skips) and 80 / 79 clips; no divergence or
saturation; the guarded runs still fail (penalty 0.214 / 0.252). The loss spikes are not this
mechanism: the z-loss runs have as many (a 16-token batch with a surprising token), so
``expected`` names only "divergence", the kind a log-Z drift detector would report. The
statistic that reveals it is log Z per token (logsumexp over the vocabulary of the output
layer's output): its mean falls linearly (about -0.024 per step here) to -400, against
|log Z| < 70 for the repaired runs; the training batches show the same values as held-out
text. Clipping, skipping or an LR backoff slow the drift at best and cannot undo it, hence
``repairable_online=False``; ``onset=0`` because the drift starts at initialisation.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

import torch
from torch import nn

from ..base import RunResult, Scenario, Setup, register
from ._common_b import _corpus, finite_run, lm_batches, lm_eval_batch, seed_all

THRESHOLD = 0.03
LR = 0.08
STEPS = 18000
MIN_COUNT = 5
SEQ = 16
BATCH = 1


@lru_cache(maxsize=1)
def word_data() -> tuple[torch.Tensor, int]:
    """The corpus as token ids and the vocabulary size. Words, single punctuation characters,
    newlines and runs of spaces that occur at least MIN_COUNT times are tokens; rarer words
    are spelled out in characters (as a subword tokenizer splits rare words): a Zipf-like
    vocabulary with a long tail."""
    raw = re.findall(r"\w+|[^\w\s]|\n| +", _corpus())
    counts = Counter(raw)
    toks: list[str] = []
    for t in raw:
        toks.extend([t] if counts[t] >= MIN_COUNT else list(t))
    vocab = {t: i for i, t in enumerate(sorted(set(toks)))}
    return torch.tensor([vocab[t] for t in toks], dtype=torch.long), len(vocab)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_ln, self.k_ln = nn.LayerNorm(d // heads), nn.LayerNorm(d // heads)
        self.proj = nn.Linear(d, d, bias=False)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(),
                                nn.Linear(4 * d, d, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(self.q_ln(q), self.k_ln(k), v,
                                                       is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.ln2(x))


class WordLM(nn.Module):
    """1-layer pre-LN decoder whose logits are rounded to ``logits_dtype`` (bf16 emulation)."""

    def __init__(self, vocab: int, d: int = 32, heads: int = 4, seq: int = SEQ,
                 logits_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.block = Block(d, heads)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.logits_dtype = logits_dtype

    def logits32(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.emb(x) + self.pos[: x.shape[1]])
        return self.head(self.ln_f(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits32(x).to(self.logits_dtype).float()


def log_z(model: WordLM, x: torch.Tensor) -> torch.Tensor:
    """Per-token log Z (logsumexp of the fp32 logits): the statistic that drifts."""
    with torch.no_grad():
        return torch.logsumexp(model.logits32(x), dim=-1)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build(seed: int, z_loss: float = 0.0, weight_decay: float = 0.0,
          logits_dtype: torch.dtype = torch.bfloat16, lr: float = LR,
          steps: int = STEPS) -> Setup:
    seed_all(seed)
    ids, vocab = word_data()
    split = int(len(ids) * 0.9)
    xe, ye = lm_eval_batch(ids, split, len(ids), 256, SEQ)
    model = WordLM(vocab, logits_dtype=logits_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=weight_decay, fused=True)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = _ce(out, y)
        if z_loss:
            ce = ce + z_loss * torch.logsumexp(out.reshape(-1, out.shape[-1]), -1).pow(2).mean()
        return ce

    def evaluate(m: nn.Module) -> float:
        # the precision penalty: held-out loss in the run's logit precision minus fp32 logits
        v = float(_ce(m(xe), ye)) - float(_ce(m.logits32(xe), ye))
        return v if math.isfinite(v) else math.inf

    return Setup(model=model, optimizer=opt, batches=lm_batches(ids, BATCH, SEQ, seed, 0, split),
                 loss_fn=loss_fn, steps=steps, evaluate=evaluate)


def passed(r: RunResult) -> bool:
    return finite_run(r) and r.metric < THRESHOLD


register(Scenario(
    name="transformer_output_logit_divergence", category="pathological",
    mechanism="Adam without weight decay lets the softmax-invariant common mode of the output "
              "logits drift: log Z goes to -hundreds and bf16 logits can no longer resolve the "
              "differences between them",
    expected=("divergence",),
    source="Wortsman et al. 2023 (arXiv 2309.14322) section 3.2; Chowdhery et al. 2022 (PaLM, "
           "arXiv 2204.02311) z-loss; research/mechanisms.md sections 5.1 and Z13",
    criterion=f"held-out bf16 precision penalty (bf16-logit loss minus fp32-logit loss of the "
              f"same model) < {THRESHOLD} nats after {STEPS} steps (z-loss 1e-4 passes)",
    build=build, passed=passed, repairable_online=False,
    prescription="add z-loss 1e-4 * log^2 Z to the loss (PaLM), or weight decay on the output "
                 "layer, or compute the output logits and the loss in fp32",
    onset=0, reference=THRESHOLD,
))
