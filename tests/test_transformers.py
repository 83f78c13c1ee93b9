"""Hugging Face Trainer adapter (issue #10, item 4): real, tiny Trainer runs on CPU."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from trainguard.integrations.transformers import GuardCallback, GuardTrainer  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


class Tiny(nn.Module):
    """A plain module with the Trainer's contract: forward(**batch) -> {"loss", "logits"}."""

    def __init__(self, nan_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
        self.nan_at, self.calls, self.losses = nan_at, 0, []

    def forward(self, x, labels=None):
        if self.training:
            if self.calls == self.nan_at:
                x = x.clone()
                x[0, 0] = float("nan")
            self.calls += 1
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels)
        if self.training:
            self.losses.append(float(loss.detach()))
        return {"loss": loss, "logits": logits}


def _dataset(n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16,
                learning_rate=1e-2, report_to=[], logging_steps=10, save_strategy="no",
                use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                disable_tqdm=True, lr_scheduler_type="linear")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _train(tmp_path, model, cls=transformers.Trainer, callbacks=(), **kw):
    extra = {"guard_options": kw.pop("guard_options")} if "guard_options" in kw else {}
    tr = cls(model=model, args=_args(tmp_path, **kw), train_dataset=_dataset(),
             callbacks=list(callbacks), **extra)
    tr.train()
    return tr


@pytest.mark.parametrize("kw", [{}, {"gradient_accumulation_steps": 2}, {"max_grad_norm": 0.0}])
def test_healthy_run_is_the_bare_run(tmp_path, kw):
    bare = Tiny()
    _train(tmp_path, bare, **kw)
    cb = GuardCallback(console=False)
    m = Tiny()
    _train(tmp_path, m, callbacks=[cb], **kw)
    g = cb.guard
    assert g.step_count == 30
    assert all(s.loss_known for s in g.history)
    assert not [f for f in g.findings if f.severe], [str(f) for f in g.findings]
    assert not [a for a in g.actions if a.kind != "clip"], [str(a) for a in g.actions]
    for a, b in zip(bare.parameters(), m.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


class TokenSum(Tiny):
    """A model that accepts loss keywords, as the library's language models do: the Trainer
    hands it ``num_items_in_batch`` (the whole step's target count, over every accumulated
    micro-batch) and it returns its micro-batch's summed loss divided by that count."""

    def forward(self, x, labels=None, **kwargs):
        logits = self.net(x)
        n = kwargs.get("num_items_in_batch")
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum") / n
        self.losses.append(float(loss.detach()))
        return {"loss": loss, "logits": logits}


@pytest.mark.parametrize("gas", [1, 4])
def test_a_loss_divided_by_the_steps_token_count_is_the_steps_loss(tmp_path, gas):
    """With gradient accumulation the model's losses are shares of the step's loss (each
    micro-batch's sum over the step's count): the Guard adds them up, seeing the loss the
    Trainer logs (it saw their mean: 1/4 of it with four micro-batches)."""
    cb = GuardCallback(console=False)
    m = TokenSum()
    tr = _train(tmp_path, m, callbacks=[cb], gradient_accumulation_steps=gas, max_steps=8,
                logging_steps=1)
    logged = [h["loss"] for h in tr.state.log_history if "loss" in h]
    seen = [s.loss for s in cb.guard.history]
    assert len(seen) == len(logged) == 8
    assert seen == pytest.approx(logged, rel=1e-3)
    assert seen == pytest.approx([sum(m.losses[i:i + gas]) for i in range(0, 8 * gas, gas)])


@pytest.mark.parametrize("use_trainer", [False, True])
def test_nan_batch_is_skipped_and_the_scheduler_holds(tmp_path, use_trainer):
    m = Tiny(nan_at=12)
    if use_trainer:
        tr = _train(tmp_path, m, cls=GuardTrainer, guard_options={"console": False})
        g = tr.guard
    else:
        cb = GuardCallback(console=False)
        tr = _train(tmp_path, m, callbacks=[cb])
        g = cb.guard
    assert [a.step for a in g.actions if a.kind == "skip"] == [12]
    assert any(f.kind == "nonfinite" and f.step == 12 for f in g.findings)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # 29 applied updates: the linear schedule stepped 29 times, not 30
    assert tr.lr_scheduler.last_epoch == 29
    ref = Tiny()
    _train(tmp_path, ref)
    assert abs(m.losses[-1] - ref.losses[-1]) < 0.15


def test_guard_trainer_measures_before_max_grad_norm(tmp_path):
    tr = _train(tmp_path, Tiny(), cls=GuardTrainer, guard_options={"console": False},
                max_grad_norm=1e-3, max_steps=5)
    assert max(s.grad_norm for s in tr.guard.history) > 1e-2  # the raw norms, not 1e-3


def test_observe_only_never_acts(tmp_path):
    cb = GuardCallback(observe=True, console=False)
    m = Tiny(nan_at=5)
    _train(tmp_path, m, callbacks=[cb], max_steps=10)
    assert any(f.kind == "nonfinite" for f in cb.guard.findings)
    assert cb.guard.actions == []


def test_lr_burst_is_repaired_or_halted_with_the_story(tmp_path):
    """lr x1e4 for a few steps (a bad schedule): repaired, or halted with the story."""
    import trainguard as tg

    class Burst(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            for g in optimizer.param_groups:
                g["lr"] = 1e2 if 8 <= state.global_step < 12 else 1e-2

    cb = GuardCallback(console=False)
    m = Tiny()
    try:
        _train(tmp_path, m, callbacks=[Burst(), cb], lr_scheduler_type="constant")
    except tg.TrainingUnstable as e:
        assert "trainguard halted" in str(e)
    g = cb.guard
    assert {a.kind for a in g.actions} & {"skip", "rollback", "lr_backoff", "clip", "halt"}
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_trainer_saves_wait_while_unhealthy(tmp_path):
    """observe=True never repairs: from step 6 the weights are NaN; with save_steps=4 and
    save_total_limit=1 the NaN checkpoint would rotate the good one away."""
    cb = GuardCallback(observe=True, console=False)
    m = Tiny(nan_at=5)
    _train(tmp_path, m, callbacks=[cb], max_steps=14, save_strategy="steps", save_steps=4,
           save_total_limit=1)
    ckpts = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-4"], ckpts
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert cb.guard.counts["checkpoint_deferred"] >= 1


def test_the_rows_of_a_bad_batch_are_named_from_compute_loss(tmp_path):
    """``guard.observe_samples`` in a ``compute_loss`` override: the NaN row is named (one
    epoch: 32 steps of 16 rows)."""
    data = _dataset()
    data[40]["x"] = data[40]["x"].clone()
    data[40]["x"][3] = float("nan")
    for i, d in enumerate(data):
        d["idx"] = torch.tensor(i)

    class RowTrainer(GuardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            idx = inputs.pop("idx")
            out = model(**inputs)
            rows = nn.functional.cross_entropy(out["logits"], inputs["labels"], reduction="none")
            self.guard.observe_samples(idx, rows)
            return (out["loss"], out) if return_outputs else out["loss"]

    model = Tiny()
    tr = RowTrainer(model=model, args=_args(tmp_path, max_steps=32, remove_unused_columns=False),
                    train_dataset=data, guard_options={"console": False})
    tr.train()
    assert [b.suspect_ids for b in tr.guard.bad_batches] == [(40,)]
    assert "skip" in tr.guard.bad_batches[0].actions
    # the locate replay's forward is not a training forward: its NaN loss did not join the
    # next step's window (it did: a second non-finite finding on a healthy batch)
    assert dict(tr.guard.finding_counts) == {"nonfinite": 1}
    bad_step = tr.guard.bad_batches[0].step
    after = [s.loss for s in tr.guard.history if s.step == bad_step + 1]
    assert after and all(math.isfinite(v) for v in after)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("use_trainer", [False, True])
def test_a_resumed_trainer_resumes_the_guard(tmp_path, use_trainer):
    # the Guard's state goes beside each checkpoint, and comes back with resume_from_checkpoint:
    # before, a resumed run's Guard started afresh (its LR scale back to 1, its histories lost)
    def run(max_steps, resume):
        cb = GuardCallback(console=False)
        cls = GuardTrainer if use_trainer else transformers.Trainer
        extra = {"guard_options": {"console": False}} if use_trainer else {}
        tr = cls(model=Tiny(nan_at=None if resume else 3),
                 args=_args(tmp_path, max_steps=max_steps, save_steps=6,
                            save_strategy="steps"),
                 train_dataset=_dataset(), callbacks=[] if use_trainer else [cb], **extra)
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6") if resume else None)
        return tr.guard if use_trainer else cb.guard

    g1 = run(6, False)
    assert (tmp_path / "checkpoint-6" / "trainguard_state.json").is_file()
    assert [a.step for a in g1.actions if a.kind == "skip"] == [3]
    g2 = run(10, True)
    assert g2.step_count == 10
    assert [a.step for a in g2.actions if a.kind == "skip"] == [3]  # the history came back
    assert g2.finding_counts["nonfinite"] == 1


def test_a_resume_without_the_guards_state_says_so(tmp_path):
    tr = transformers.Trainer(model=Tiny(), args=_args(tmp_path, max_steps=6, save_steps=6,
                                                       save_strategy="steps"),
                              train_dataset=_dataset())
    tr.train()
    events = []

    class Listen(GuardCallback):
        pass
    cb = Listen(console=False)
    tr = transformers.Trainer(model=Tiny(), args=_args(tmp_path, max_steps=8, save_steps=6,
                                                       save_strategy="steps"),
                              train_dataset=_dataset(), callbacks=[cb])
    from trainguard.sinks.base import Sink

    class Events(Sink):
        def on_event(self, kind, step, data):
            events.append(kind)
    cb.options["sinks"] = [Events()]
    tr.train(resume_from_checkpoint=True)
    assert "resumed_without_guard_state" in events
    assert cb.guard.step_count == 2  # its own steps: it starts afresh


def test_a_real_language_model_with_accumulation_is_judged_at_its_own_scale(tmp_path):
    """A tiny GPT-2 under the Trainer with gradient_accumulation_steps=4: its forward takes
    loss keywords, so each micro-batch's loss is a quarter share. The Guard saw a quarter of the
    logged loss, and no chance level; now the logged losses and ln 256."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=256, n_positions=32)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (32,), generator=g)
    data = []
    for _ in range(128):
        ids = (base + torch.randint(0, 3, (32,), generator=g)).clamp(max=255)
        data.append({"input_ids": ids, "labels": ids.clone()})
    cb = GuardCallback(console=False)
    args = _args(tmp_path, max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                 learning_rate=1e-3, logging_steps=1, lr_scheduler_type="constant")
    tr = transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args,
                              train_dataset=data, callbacks=[cb])
    tr.train()
    logged = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert [s.loss for s in cb.guard.history] == pytest.approx(logged, rel=1e-3)
    assert cb.guard.core.chance_loss == pytest.approx(math.log(256))


@pytest.mark.dist
@pytest.mark.parametrize("accumulation", [1, 2])
def test_under_torchrun_the_guard_sees_the_loss_the_trainer_logs(accumulation, tmp_path):
    """Two processes (gloo), a model handed ``num_items_in_batch``: the Trainer multiplies each
    share by the number of processes (``average_tokens_across_devices``, the default), and so
    does the adapter; without it the Guard saw half the loss, and no chance level."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).parent / "dist" / "hf_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", str(worker), str(tmp_path),
           str(accumulation)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["world"] == 2 and r["average"] is True
        assert len(r["logged"]) == 6
        assert r["guard"] == pytest.approx(r["logged"], rel=1e-5)
        assert r["chance"] == pytest.approx(math.log(256))
        assert r["findings"] == []
