"""trainguard on the demos Lightning ships (``lightning.pytorch.demos``): the word-level LSTM
(``LightningLSTM``: a 4-layer LSTM of width 512 carrying its hidden state from one
``training_step`` to the next, SGD at lr 20 with no clipping) and the Transformer
(``LightningTransformer``: ``nn.Transformer`` of width 200, SGD 0.1), as their modules define
them, on a word corpus of this machine instead of WikiText-2 (nothing downloads).

    python bench/lightning_demos_trial.py --text CORPUS.txt [--demos lstm,transformer]
                                          [--steps 150,300] [--doctor-only]

For each demo: ``tg.doctor(module, None, loader)`` (the loss of its ``training_step``, the
optimizer of its ``configure_optimizers``), then ``Trainer.fit`` bare and with
``GuardCallback()`` for ``--steps`` steps (one per demo), printing every 25th training loss, the
mean of the last 20, and the Guard's summary. Vocabulary: the corpus's 1,999 most frequent words
and one for the rest; blocks of 35 tokens (the LSTM's batches of 20 are its own
``SequenceSampler``'s; the Transformer's, 16 shuffled blocks).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

use_tree()

import torch  # noqa: E402

import trainguard as tg  # noqa: E402

VOCAB = 2000
BLOCK = 35


def tokens(path: str, n: int = 120_000) -> torch.Tensor:
    with open(path, encoding="utf-8", errors="replace") as f:
        words = re.findall(r"[A-Za-z]+", f.read())[:n]
    top = [w for w, _ in collections.Counter(words).most_common(VOCAB - 1)]
    idx = {w: i + 1 for i, w in enumerate(top)}
    return torch.tensor([idx.get(w, 0) for w in words])


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids) // BLOCK - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * BLOCK
        return self.ids[s:s + BLOCK], self.ids[s + 1:s + 1 + BLOCK]


def build(demo: str, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    from lightning.pytorch.demos.lstm import LightningLSTM, SequenceSampler
    from lightning.pytorch.demos.transformer import LightningTransformer
    torch.manual_seed(0)
    ds = Blocks(ids)
    if demo == "lstm":
        model = LightningLSTM(vocab_size=VOCAB)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=SequenceSampler(ds, batch_size=20))
    else:
        model = LightningTransformer(vocab_size=VOCAB)
        loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
    model.prepare_data = lambda: None  # the demos download WikiText-2 there
    return model, loader


def fit(demo: str, ids: torch.Tensor, steps: int, guarded: bool) -> tuple[list[float], str]:
    import lightning as L
    model, loader = build(demo, ids)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            losses.append(float(outputs["loss"]))

    cbs: list = [Record()]
    if guarded:
        from trainguard.integrations.lightning import GuardCallback
        guard_cb = GuardCallback(console=False)
        cbs.append(guard_cb)
    trainer = L.Trainer(max_steps=steps, callbacks=cbs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0)
    trainer.fit(model, loader)
    return losses, (guard_cb.guard.summary() if guarded and guard_cb.guard else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True, help="a plain-text corpus (about 1 MB)")
    ap.add_argument("--demos", default="lstm,transformer")
    ap.add_argument("--steps", default="150,300", help="fit steps per demo, in --demos order")
    ap.add_argument("--doctor-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    ids = tokens(a.text)
    demos = [d for d in a.demos.split(",") if d]
    steps = [int(s) for s in a.steps.split(",")]
    for demo, n in zip(demos, steps + [steps[-1]] * len(demos)):
        model, loader = build(demo, ids)
        print(f"=== {demo}: the doctor")
        print(tg.doctor(model, None, loader, progress=False))
        if a.doctor_only:
            continue
        for guarded in (False, True):
            losses, summary = fit(demo, ids, n, guarded)
            print(f"=== {demo}: fit {n} steps {'with GuardCallback' if guarded else 'bare'}: losses "
                  f"{[round(v, 3) for v in losses[::25]]}, mean of the last 20 "
                  f"{sum(losses[-20:]) / 20:.4g}")
            if summary:
                print(summary)


if __name__ == "__main__":
    main()
