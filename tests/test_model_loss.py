"""The Guard reads the loss a model returns when the loop shows it none (``model_loss.py``):
minGPT's ``Trainer`` calls ``optimizer.step()`` itself, so a ``GuardedOptimizer`` there got no
loss and the loss-based detectors sat every step out. Real tiny models, no mocks."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.model_loss import loss_in_output

torch.set_num_threads(1)


class SelfLoss(nn.Module):
    """``forward(x, targets=None)`` returns ``(logits, loss)``, as nanoGPT and minGPT do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.net(x)
        return logits, (nn.functional.cross_entropy(logits, targets) if targets is not None else None)


def _batch(g: torch.Generator, n: int = 32):
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long()


@dataclass
class _Output:  # the shape of a Hugging Face ModelOutput seen as an object
    loss: torch.Tensor | None
    logits: torch.Tensor


def test_the_loss_is_found_where_models_put_it():
    loss, logits = torch.tensor(0.7), torch.randn(4, 3)
    assert loss_in_output(loss) is loss
    assert loss_in_output((logits, loss)) is loss                  # nanoGPT, minGPT, makemore
    assert loss_in_output([loss.reshape(1), logits]) is not None   # HF tuple: (loss, logits)
    assert loss_in_output({"loss": loss, "logits": logits}) is loss
    assert loss_in_output(_Output(loss, logits)) is loss
    assert loss_in_output(_Output(None, logits)) is None           # HF without labels
    assert loss_in_output(logits) is None and loss_in_output((logits, None)) is None
    assert loss_in_output(torch.tensor(3)) is None                 # an integer is no loss
    assert loss_in_output((torch.ones(1), loss)) is loss           # a 0-d one first


def test_a_guarded_optimizer_in_a_trainer_that_keeps_the_loss_sees_the_models_loss():
    torch.manual_seed(0)
    model = SelfLoss()
    bare = copy.deepcopy(model)
    opt = tg.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, console=False)
    bopt = torch.optim.AdamW(bare.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    seen = []
    for t in range(30):
        x, y = _batch(g)
        # minGPT's Trainer: forward, zero_grad, backward, clip, step; no loss to the optimizer
        for m, o in ((model, opt), (bare, bopt)):
            _, loss = m(x, y)
            m.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
        seen.append(float(loss.detach()))
        if t % 10 == 0:  # an evaluation between steps: not the step's loss
            with torch.no_grad():
                model.eval()
                model(x + 100, y)
                model.train()
    h = list(opt.guard.history)
    assert all(s.loss_known for s in h)
    assert [s.loss for s in h] == pytest.approx(seen, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), bare.parameters()))
    assert not opt.guard.findings


def test_accumulated_micro_batches_give_their_mean():
    torch.manual_seed(0)
    model = SelfLoss()
    guard = tg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), console=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        losses = []
        for _ in range(4):
            x, y = _batch(g, 8)
            _, loss = model(x, y)
            (loss / 4).backward()
            losses.append(float(loss.detach()))
        guard.step()
        model.zero_grad(set_to_none=True)
        assert guard.history[-1].loss == pytest.approx(sum(losses) / 4, rel=1e-6)


class ItemsLoss(SelfLoss):
    """A Hugging Face language model's contract: handed ``num_items_in_batch`` (the whole
    step's target count), it returns its micro-batch's summed loss divided by that count."""

    def forward(self, x, targets=None, **kwargs):
        logits = self.net(x)
        n = kwargs.get("num_items_in_batch")
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum" if n else "mean")
        return logits, (loss / n if n else loss)


def test_micro_batches_divided_by_the_steps_item_count_give_their_sum():
    """The losses of a step's forwards that were handed ``num_items_in_batch`` are shares of
    the step's loss: their mean was a quarter of it over four micro-batches."""
    torch.manual_seed(0)
    model = ItemsLoss()
    guard = tg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), console=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        batches = [_batch(g, 8) for _ in range(4)]
        total = sum(len(y) for _, y in batches)
        shares = []
        for x, y in batches:
            _, loss = model(x, y, num_items_in_batch=total)
            loss.backward()
            shares.append(float(loss.detach()))
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        with torch.no_grad():
            whole = float(model(x, y)[1])  # the step's mean loss, in one batch
        guard.step()
        model.zero_grad(set_to_none=True)
        assert guard.history[-1].loss == pytest.approx(sum(shares), rel=1e-6)
        assert guard.history[-1].loss == pytest.approx(whole, rel=1e-5)


def test_the_hook_goes_once_the_loop_shows_the_loss_or_the_model_returns_none():
    torch.manual_seed(0)
    model = SelfLoss()
    guard = tg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), console=False)
    assert guard._model_loss.armed
    g = torch.Generator().manual_seed(0)
    x, y = _batch(g)
    _, loss = model(x, y)
    loss.backward()
    guard.step(loss * 2)  # the loop's loss wins (here: another scale than the model's)
    assert guard.history[-1].loss == pytest.approx(2 * float(loss.detach()))
    assert not guard._model_loss.armed
    guard.close()

    plain = nn.Sequential(nn.Linear(8, 2))
    opt = tg.GuardedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1), plain, console=False)
    for _ in range(3):
        x, y = _batch(g)
        opt.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        opt.step()
    assert opt.guard._model_loss.gave_up and not opt.guard._model_loss.armed
    assert not any(s.loss_known for s in opt.guard.history)
    assert not plain._forward_hooks or len(plain._forward_hooks) == 1  # the locate capture's


def _trainer_steps(model: nn.Module, steps: int, loss_of, nan_at: int | None = None):
    """A trainer that keeps the loss to itself (minGPT's): a GuardedOptimizer stepped bare."""
    opt = tg.GuardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, console=False)
    g = torch.Generator().manual_seed(0)
    for t in range(steps):
        x, y = _batch(g)
        if t == nan_at:
            x[0, 0] = math.nan
        opt.zero_grad()
        loss_of(model(x, y), y).backward()
        opt.step()
    return opt


def test_a_loss_that_turns_nan_in_the_model_is_the_steps_loss():
    torch.manual_seed(0)
    opt = _trainer_steps(SelfLoss(), 12, lambda out, y: out[1], nan_at=8)
    assert [a.step for a in opt.guard.actions if a.kind == "skip"] == [8]
    assert math.isnan(opt.guard.history[8].loss) and opt.guard.history[8].loss_known


class WithAccuracy(SelfLoss):
    """Returns ``(logits, accuracy)``: a scalar with no graph is a metric, not the loss."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.net(x)
        return logits, (logits.argmax(1) == targets).float().mean()


def test_a_metric_returned_beside_the_logits_is_not_the_loss():
    torch.manual_seed(0)
    opt = _trainer_steps(WithAccuracy(), 3, lambda out, y: nn.functional.cross_entropy(out[0], y))
    assert not any(s.loss_known for s in opt.guard.history)
    assert opt.guard._model_loss.gave_up


def test_an_accelerate_loop_with_accumulation_needs_no_observe_loss():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = SelfLoss()
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = tg.GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, console=False)
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader([_batch(g, 1) for _ in range(160)], batch_size=8,
                                         collate_fn=lambda b: (torch.cat([x for x, _ in b]),
                                                               torch.cat([y for _, y in b])))
    model, opt, loader = acc.prepare(model, opt, loader)
    micro = []
    for x, y in loader:
        with acc.accumulate(model):
            _, loss = model(x, y)
            acc.backward(loss)
            micro.append(float(loss.detach()))
            opt.step()
            opt.zero_grad()
    h = list(opt.optimizer.guard.history)
    assert len(h) == 10 and all(s.loss_known for s in h)
    assert [s.loss for s in h] == pytest.approx([(a + b) / 2 for a, b in zip(micro[::2], micro[1::2])],
                                                rel=1e-6)


def test_the_hook_keeps_no_graph_alive_and_reads_the_loss_kind_once():
    # a training forward with no backward after it (a side computation with grad on): the
    # reader kept the first loss with its graph, and the activations with it, until the step
    import gc
    import weakref

    torch.manual_seed(0)
    model = SelfLoss()
    guard = tg.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), console=False)
    x, y = _batch(torch.Generator().manual_seed(0))
    out = model(x, y)
    ref = weakref.ref(out[1])
    del out
    gc.collect()
    assert ref() is None
    _, loss = model(x, y)
    loss.backward()
    guard.step()
    assert guard._loss_kind[0] == "plain_cross_entropy"  # from the model's F.cross_entropy
    assert guard._model_loss.kind_of is None and guard._model_loss.armed
