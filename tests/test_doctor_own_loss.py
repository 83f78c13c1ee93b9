"""The doctor and repair on models that compute their own loss (``loss_fn=None``): nanoGPT's
and makemore's ``forward(idx, targets)`` returning ``(logits, loss)``, a Hugging Face model
called as ``model(**batch)`` with the labels in the batch. Before, the doctor called
``loss_fn(model(x), y)`` only, and such models needed a wrapper module and a loss function
written by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.doctor import DoctorInputError

torch.set_num_threads(1)


class OwnLoss(nn.Module):
    """A deep sigmoid classifier written as nanoGPT writes its model: ``forward(x,
    targets=None)`` returns ``(logits, loss)``, the loss None without targets."""

    def __init__(self, depth: int = 8, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 16
        for _ in range(depth):
            lin = nn.Linear(d, width)
            b = 1 / math.sqrt(d)  # pre-2010 U[±1/√fan_in]: vanishing through the sigmoids
            nn.init.uniform_(lin.weight, -b, b)
            layers += [lin, nn.Sigmoid()]
            d = width
        layers.append(nn.Linear(d, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss


def _data(n: int = 512, bs: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 16, generator=g)
    y = ((X[:, 0] * X[:, 1] + X[:, 2]) > 0).long()
    return [(X[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)], X, y


def test_a_model_returning_its_loss_gets_the_diagnosis_of_the_same_loss_given_outside():
    torch.manual_seed(0)
    model = OwnLoss()
    data, _, _ = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    own = tg.doctor(model, None, data, optimizer=opt, progress=False)
    outside = tg.doctor(model, lambda out, y: nn.functional.cross_entropy(out[0], y), data,
                        optimizer=opt, progress=False)
    assert "vanishing_gradient" in own.kinds
    assert own.kinds == outside.kinds
    assert own.max_stable_lr == pytest.approx(outside.max_stable_lr, rel=1e-9)
    assert own.suggested_lr == outside.suggested_lr
    assert [p.action for p in own.prescriptions] == [p.action for p in outside.prescriptions]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_repair_takes_a_model_returning_its_loss():
    data, X, y = _data(n=1024)
    Xt, yt = X[768:], y[768:]

    def acc(m: nn.Module) -> float:
        return float((m(Xt)[0].argmax(1) == yt).float().mean())

    res = tg.repair(lambda: OwnLoss(), lambda p: torch.optim.SGD(p, lr=0.1), None, data[:12],
                    steps=250, metric=acc, max_trials=1, progress=False)
    assert res.trials[0].remedy == "act:relu+init:he"
    assert res.metric > res.baseline_metric + 0.15, (res.metric, res.baseline_metric)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 64, (8, 16), generator=g)
        batches.append(transformers.BatchEncoding(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}))
    return transformers.GPT2LMHeadModel(cfg), batches


def test_a_hugging_face_model_is_diagnosed_from_its_batches():
    model, batches = _tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    rep = tg.doctor(model, None, batches, optimizer=opt, lr_range=False, progress=False)
    assert rep.max_stable_lr is not None and math.isfinite(rep.max_stable_lr)
    assert len(rep.layers) > 10
    assert not [f for f in rep.findings if f.severity == "error"], rep.findings
    assert rep.precision is not None and rep.precision.can_train["bf16"].startswith("yes")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_what_the_doctor_cannot_use_is_named():
    model, batches = _tiny_gpt2()
    with pytest.raises(DoctorInputError, match="loss_fn=None"):  # a mapping with a loss_fn
        tg.doctor(model, nn.CrossEntropyLoss(), batches, progress=False)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(DoctorInputError, match="labels"):  # HF: loss None without labels
        tg.doctor(model, None, no_labels, progress=False)
    with pytest.raises(DoctorInputError, match=r"model\(x, y\)"):
        tg.doctor(nn.Linear(16, 2), None, _data()[0], progress=False)
    with pytest.raises(DoctorInputError, match="or None"):
        tg.doctor(nn.Linear(16, 2), "mse", _data()[0], progress=False)
    with pytest.raises(DoctorInputError, match=r"\(x, y\) pair.*mapping"):
        tg.doctor(nn.Linear(16, 2), None, [torch.zeros(2, 16)], progress=False)
    with pytest.raises(DoctorInputError, match=r"must return its loss.*shape \(4, 2\)"):
        tg.doctor(nn.Bilinear(16, 1, 2), None, [(torch.zeros(4, 16), torch.zeros(4, 1))],
                  progress=False)


def _lightning_module(weighted: bool = False):
    L = pytest.importorskip("lightning")

    class Lit(L.LightningModule):
        """A LightningModule as people write one: the loss in training_step, self.log, its
        own optimizer in configure_optimizers."""

        def __init__(self) -> None:
            super().__init__()
            self.net = OwnLoss().net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch[0], batch[1]
            loss = nn.functional.cross_entropy(self(x), y, reduction="none")
            loss = (loss * batch[2]).mean() if weighted else loss.mean()
            self.log("train_loss", loss)
            return {"loss": loss}

        def configure_optimizers(self):
            return {"optimizer": torch.optim.SGD(self.parameters(), lr=0.1)}

    torch.manual_seed(0)
    return Lit()


def test_a_lightning_module_is_diagnosed_from_its_training_step():
    import warnings

    lit = _lightning_module()
    # batches of 256: the probe is the first batch for both (a LightningModule's batches are
    # never concatenated into a larger probe: see trainguard.doctor._common.Whole)
    data, _, _ = _data(bs=256)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        own = tg.doctor(lit, None, data, progress=False)
    assert not [w for w in said if "self.log" in str(w.message)]
    assert own.optimizer == "sgd" and own.lr == 0.1  # configure_optimizers' own
    outside = tg.doctor(lit, nn.CrossEntropyLoss(), data,
                        optimizer=torch.optim.SGD(lit.parameters(), lr=0.1), progress=False)
    assert "vanishing_gradient" in own.kinds and own.kinds == outside.kinds
    assert own.max_stable_lr == pytest.approx(outside.max_stable_lr, rel=1e-9)
    # a batch that is not an (x, y) pair goes to training_step as the DataLoader yields it
    weighted = _lightning_module(weighted=True)
    triples = [(x, y, torch.ones(len(y))) for x, y in data]
    rep = tg.doctor(weighted, None, triples, progress=False)
    assert rep.kinds == own.kinds and rep.noise is not None and rep.noise.batch == 256
    res = tg.repair(lambda: _lightning_module(weighted=True), lambda p: torch.optim.SGD(p, lr=0.1),
                    None, triples, steps=100, max_trials=1, progress=False)
    assert res.trials[0].remedy == "act:relu+init:he" and res.metric < res.baseline_metric


def test_a_lightning_module_that_keeps_state_between_steps_gets_its_own_batches():
    # Lightning's LSTM demo carries its hidden state, sized by the batch, from one
    # training_step to the next: a probe of 256 concatenated samples failed with "Expected
    # hidden[0] size (4, 20, 512), got [4, 256, 512]"
    L = pytest.importorskip("lightning")

    class Stateful(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(16, 8), nn.GRU(8, 16, batch_first=True), nn.Linear(16, 16)
            self.hidden: torch.Tensor | None = None

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.hidden.detach() if self.hidden is not None else None
            out, self.hidden = self.rnn(self.emb(x), h)
            return nn.functional.cross_entropy(self.head(out).reshape(-1, 16), y.reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    seq = torch.arange(20 * 8 * 12) % 16
    data = [(seq[i * 160:(i + 1) * 160].reshape(20, 8), (seq[i * 160:(i + 1) * 160].reshape(20, 8) + 1) % 16)
            for i in range(10)]
    rep = tg.doctor(Stateful(), None, data, progress=False)
    assert rep.noise is not None and rep.noise.batch == 20 and math.isfinite(rep.max_stable_lr)
