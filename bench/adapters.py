"""Per-step cost of each framework adapter against the same framework bare, side by side.

    python bench/adapters.py [--rounds 5] [--steps 60] [--threads 1] [--json PATH]

One model (an MLP 64-512x3-10 with Adam on a 256-sample batch: a bare step of a few ms on
one CPU thread, the worst case for a probe that reads every gradient) trained by each framework
bare and with its trainguard adapter: Lightning (``GuardCallback``), the Hugging Face Trainer
(``GuardTrainer``), accelerate (``GuardedOptimizer`` before ``prepare``), and the plain loop
(``Guard``) for reference. Each run times every step after a warm-up of 10 (the interval between
consecutive step starts, so the framework's own per-step work is included) and keeps the
median; runs are interleaved round-robin for ``--rounds`` rounds and each guarded run is divided
by the bare run of the same framework in the same round; the median ratio is reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import trainguard as tg  # noqa: E402

WARM = 10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(steps * 256, 64, generator=g), torch.randint(0, 10, (steps * 256,), generator=g)


def per_step(stamps: list[float]) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][WARM:]
    return statistics.median(gaps) * 1e3


def plain(steps: int, guarded: bool) -> float:
    m = make_model()
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, o, console=False) if guarded else None
    x, y = data(steps)
    stamps = []
    for t in range(steps):
        stamps.append(time.perf_counter())
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x[t * 256:(t + 1) * 256]), y[t * 256:(t + 1) * 256])
        loss.backward()
        g.step(loss) if g is not None else o.step()
    stamps.append(time.perf_counter())
    return per_step(stamps)


def lightning(steps: int, guarded: bool) -> float:
    import lightning.pytorch as L
    from trainguard.integrations.lightning import GuardCallback

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_start(self, *a: Any) -> None:
            stamps.append(time.perf_counter())

    x, y = data(steps)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    cbs: list = [Stamp()] + ([GuardCallback(console=False)] if guarded else [])
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=cbs).fit(Net(), loader)
    return per_step(stamps)


def transformers(steps: int, guarded: bool) -> float:
    import transformers as hf
    from trainguard.integrations.transformers import GuardTrainer

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    stamps: list[float] = []

    class Stamp(hf.TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            stamps.append(time.perf_counter())

    x, y = data(steps)
    ds = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    with tempfile.TemporaryDirectory() as tmp:
        args = hf.TrainingArguments(output_dir=tmp, max_steps=steps, per_device_train_batch_size=256,
                                    learning_rate=1e-3, report_to=[], save_strategy="no",
                                    use_cpu=True, disable_tqdm=True, logging_steps=10**6,
                                    dataloader_num_workers=0, max_grad_norm=1.0)
        cls = GuardTrainer if guarded else hf.Trainer
        extra = {"guard_options": {"console": False}} if guarded else {}
        cls(model=Net(), args=args, train_dataset=ds, callbacks=[Stamp()], **extra).train()
    return per_step(stamps)


def accelerate(steps: int, guarded: bool) -> float:
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    m = make_model()
    o: torch.optim.Optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
    if guarded:
        o = tg.GuardedOptimizer(o, m, console=False)
    m, o = acc.prepare(m, o)
    x, y = data(steps)
    stamps = []
    for t in range(steps):
        stamps.append(time.perf_counter())
        loss = nn.functional.cross_entropy(m(x[t * 256:(t + 1) * 256]), y[t * 256:(t + 1) * 256])
        acc.backward(loss)
        if guarded:
            o.optimizer.guard.observe_loss(loss)
        o.step()
        o.zero_grad()
    stamps.append(time.perf_counter())
    return per_step(stamps)


FRAMEWORKS: dict[str, Callable[[int, bool], float]] = {
    "plain loop (Guard)": plain, "Lightning (GuardCallback)": lightning,
    "HF Trainer (GuardTrainer)": transformers, "accelerate (GuardedOptimizer)": accelerate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    times: dict[str, dict[bool, list[float]]] = {k: {False: [], True: []} for k in FRAMEWORKS}
    for r in range(a.rounds):
        for name, fn in FRAMEWORKS.items():
            for guarded in ((False, True) if r % 2 == 0 else (True, False)):
                try:
                    times[name][guarded].append(fn(a.steps, guarded))
                except ImportError as e:
                    print(f"{name}: skipped ({e})")
                    break
    print(f"MLP 64-512x3-10, Adam, batch 256, {a.threads} thread(s); {a.rounds} interleaved rounds "
          f"of {a.steps} steps (median step after {WARM} warm-up steps)")
    print(f"{'framework':<32}{'bare ms':>9}{'guarded ms':>12}{'ratio':>8}")
    result = {}
    for name, t in times.items():
        if not t[True]:
            continue
        ratio = statistics.median(g / b for g, b in zip(t[True], t[False]))
        result[name] = {"bare_ms": statistics.median(t[False]),
                        "guarded_ms": statistics.median(t[True]), "ratio": ratio}
        print(f"{name:<32}{result[name]['bare_ms']:>9.2f}{result[name]['guarded_ms']:>12.2f}"
              f"{ratio:>8.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
