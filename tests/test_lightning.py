"""Lightning 2.x adapter (issue #10, item 3): real, tiny Trainer runs on CPU."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")
from trainguard.integrations.lightning import GuardCallback  # noqa: E402

import trainguard as tg  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return torch.utils.data.TensorDataset(x, y)


class Net(L.LightningModule):
    def __init__(self, lr=1e-2, nan_at=None, lr_boost=None, manual=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
        self.lr, self.nan_at, self.lr_boost = lr, nan_at, lr_boost
        self.automatic_optimization = not manual
        self.losses: list[float] = []
        self.calls = 0

    def _loss(self, batch):
        x, y = batch
        if self.nan_at is not None and self.calls == self.nan_at:
            x = x.clone()
            x[0, 0] = float("nan")
        self.calls += 1
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self._loss(batch)
        opt = self.optimizers()
        opt.zero_grad()
        loss = self._loss(batch)
        self.manual_backward(loss)
        opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def on_train_batch_start(self, batch, batch_idx):
        if self.lr_boost is not None:
            start, stop, factor = self.lr_boost
            for g in self.trainer.optimizers[0].param_groups:
                g["lr"] = self.lr * (factor if start <= self.calls < stop else 1.0)


def _fit(model, callbacks=(), steps=40, **kw):
    loader = torch.utils.data.DataLoader(_data(), batch_size=32, shuffle=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks), **kw)
    trainer.fit(model, loader)
    return trainer


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("kw", [{}, {"gradient_clip_val": 1.0}, {"accumulate_grad_batches": 2},
                                {"precision": "bf16-mixed"}])
def test_healthy_run_is_the_bare_run(kw):
    bare = Net()
    _fit(bare, **kw)
    cb = GuardCallback(console=False)
    guarded = Net()
    _fit(guarded, [cb], **kw)
    g = cb.guard
    assert g is not None and g.step_count == (40 if "accumulate_grad_batches" not in kw else 40)
    assert not [f for f in g.findings if f.severe], [str(f) for f in g.findings]
    assert not [a for a in g.actions if a.kind != "clip"], [str(a) for a in g.actions]
    for a, b in zip(_params(bare), _params(guarded)):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("manual", [False, True])
def test_nan_batch_is_skipped_at_its_step(manual):
    cb = GuardCallback(console=False)
    m = Net(nan_at=25, manual=manual)
    _fit(m, [cb])
    g = cb.guard
    assert [a.step for a in g.actions if a.kind == "skip"] == [25]
    assert all(torch.isfinite(p).all() for p in m.parameters())
    ref = Net()
    _fit(ref)
    assert abs(m.losses[-1] - ref.losses[-1]) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Lightning runs '16-mixed' on CUDA only (bench/gpu.sh runs it)")
def test_fp16_mixed_precision_scaler_protocol_kept():
    cb = GuardCallback(console=False)
    m = Net(nan_at=20)
    loader = torch.utils.data.DataLoader(_data(), batch_size=32)
    trainer = L.Trainer(max_steps=40, accelerator="cuda", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb], precision="16-mixed")
    trainer.fit(m, loader)
    g = cb.guard
    assert g.scaler is not None
    assert 20 in [f.step for f in g.findings if f.kind == "nonfinite"]
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_lr_times_100_is_repaired_or_halted_with_the_story():
    cb = GuardCallback(console=False)
    m = Net(lr=1e-2, lr_boost=(20, 26, 1e4))
    try:
        _fit(m, [cb], steps=60)
    except tg.TrainingUnstable as e:
        assert "trainguard halted" in str(e)
    g = cb.guard
    assert {a.kind for a in g.actions} & {"skip", "rollback", "lr_backoff", "clip", "halt"}
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_observe_only_never_acts():
    cb = GuardCallback(observe=True, console=False)
    m = Net(nan_at=10)
    bare = Net(nan_at=10)
    _fit(bare, steps=20)
    _fit(m, [cb], steps=20)
    assert any(f.kind == "nonfinite" for f in cb.guard.findings)
    assert cb.guard.actions == []
    for a, b in zip(_params(bare), _params(m)):
        assert torch.equal(a, b) or (torch.isnan(a).any() and torch.isnan(b).any())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="sync=False"):
        GuardCallback(sync=False)
    with pytest.raises(ValueError, match="scaler"):
        GuardCallback(scaler=object())


def test_findings_reach_the_loggers_and_state_is_checkpointed(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    cb = GuardCallback(console=False)
    m = Net(nan_at=12)
    loader = torch.utils.data.DataLoader(_data(), batch_size=32)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", devices=1,
                        logger=CSVLogger(str(tmp_path), name="run"), enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb],
                        default_root_dir=str(tmp_path))
    trainer.fit(m, loader)
    text = "".join(p.read_text() for p in tmp_path.rglob("metrics.csv"))
    assert "trainguard/action/skip" in text and "trainguard/finding/nonfinite" in text
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["trainguard"]
    assert saved["action_counts"] == {"skip": 1}


def test_no_checkpoint_of_nonfinite_weights(tmp_path):
    cb = GuardCallback(console=False)
    m = Net()
    _fit(m, [cb], steps=5)
    with torch.no_grad():
        m.net[0].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        cb.on_save_checkpoint(None, m, {})


def test_model_checkpoint_waits_while_unhealthy(tmp_path):
    """observe=True never repairs: from step 12 the weights are NaN. ModelCheckpoint saves every
    5 steps, keeping one file; without the Guard's deferral the NaN weights would replace the
    last good checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    cb = GuardCallback(observe=True, console=False)
    mc = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=5, save_top_k=1)
    m = Net(nan_at=12)
    loader = torch.utils.data.DataLoader(_data(), batch_size=32)
    trainer = L.Trainer(max_steps=25, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb, mc], default_root_dir=str(tmp_path))
    trainer.fit(m, loader)
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert files == ["epoch=1-step=10.ckpt"], files
    sd = torch.load(tmp_path / files[0], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert cb.guard.counts["checkpoint_deferred"] >= 1
    assert "_save_topk_checkpoint" not in mc.__dict__  # the wrapper is gone after fit


class LBFGSNet(Net):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=3)


def test_lbfgs_under_lightning_takes_the_bare_steps():
    """Lightning hands LBFGS its closure (training_step + backward); guarded, the first
    evaluation is the one the Guard measured, and the run equals the bare one (it died with
    "LBFGS.step() missing 1 required positional argument: 'closure'" before)."""
    bare = LBFGSNet()
    _fit(bare, steps=4)
    guarded = LBFGSNet()
    cb = GuardCallback(console=False)
    _fit(guarded, [cb], steps=4)
    assert guarded.calls == bare.calls and guarded.losses == bare.losses
    assert all(torch.equal(a, b) for a, b in zip(_params(bare), _params(guarded)))
    assert cb.guard is not None and cb.guard.core.step_count == 4 and not cb.guard.findings


def test_the_rows_of_a_bad_batch_are_named_from_training_step():
    """``guard.observe_samples`` in ``training_step``: the NaN row of the data is named."""
    x, y = _data().tensors
    x = x.clone()
    x[77, 3] = float("nan")
    ds = torch.utils.data.TensorDataset(torch.arange(len(x)), x, y)
    cb = GuardCallback(console=False)

    class Rows(Net):
        def training_step(self, batch, batch_idx):
            idx, xb, yb = batch
            rows = nn.functional.cross_entropy(self.net(xb), yb, reduction="none")
            cb.guard.observe_samples(idx, rows)
            return rows.mean()

    model = Rows()
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, loader)
    assert [b.suspect_ids for b in cb.guard.bad_batches] == [(77,)]
    assert cb.guard.bad_batches[0].step == 2 and "skip" in cb.guard.bad_batches[0].actions
    assert all(math.isfinite(float(p.sum())) for p in model.parameters())


class GAN(L.LightningModule):
    """The Lightning GAN recipe: manual optimization, opt_g and opt_d stepped in turn."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.G = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                               nn.Linear(64, 2))
        self.D = nn.Sequential(nn.Linear(2, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64),
                               nn.LeakyReLU(0.2), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        real, = batch
        opt_g, opt_d = self.optimizers()
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        fake = self.G(torch.randn(len(real), 4))
        loss_d = bce(self.D(real), ones) + bce(self.D(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = bce(self.D(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self):
        return [torch.optim.Adam(self.G.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.D.parameters(), lr=1e-3, betas=(0.5, 0.999))]


def _ring_loader(batches=200):
    ring = torch.tensor([[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)]
                         for k in range(8)]) * 2
    g = torch.Generator().manual_seed(0)
    data = ring[torch.randint(0, 8, (64 * batches,), generator=g)] + 0.05 * torch.randn(
        64 * batches, 2, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=64)


def _fit_gan(model, callbacks, max_steps=400, **kw):
    torch.manual_seed(1)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, **kw)
    trainer.fit(model, _ring_loader())
    return trainer


def test_a_gan_with_two_optimizers_has_a_guard_per_player(tmp_path):
    # before, the first optimizer's Guard (on the whole module) decided at both optimizers'
    # steps with the other player's loss, and the discriminator's step went unguarded
    cb = GuardCallback(console=False, log=str(tmp_path / "run.jsonl"))
    guarded = GAN()
    _fit_gan(guarded, [cb])
    bare = GAN()
    _fit_gan(bare, [])
    assert cb.players == ["G", "D"] and cb.guard is cb.guards[0]
    assert [g.model for g in cb.guards] == [guarded.G, guarded.D]
    assert all(g.core.coupled for g in cb.guards)
    assert [g.core.step_count for g in cb.guards] == [200, 200]
    assert not any(g.findings or g.actions for g in cb.guards)
    # a healthy run is the bare run, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(guarded.parameters(), bare.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.D.jsonl", "run.G.jsonl"]
    assert [[s.prefix for s in g.core.sinks if hasattr(s, "prefix")] for g in cb.guards] == [
        ["trainguard/G"], ["trainguard/D"]]


class NaNCritic(GAN):
    """The discriminator's loss is NaN on batch 50 (a bad real batch)."""

    def training_step(self, batch, batch_idx):
        real, = batch
        if batch_idx == 50:
            real = real * float("nan")
        return super().training_step((real,), batch_idx)


def test_a_nan_in_the_discriminators_step_is_skipped_by_its_own_guard():
    cb = GuardCallback(console=False)
    model = NaNCritic()
    _fit_gan(model, [cb], max_steps=200)
    g_guard, d_guard = cb.guards
    assert [(a.step, a.kind) for a in d_guard.actions] == [(50, "skip")]
    assert d_guard.findings[0].kind == "nonfinite" and d_guard.findings[0].step == 50
    assert not g_guard.findings and not g_guard.actions
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_players_state_round_trips_through_a_checkpoint(tmp_path):
    cb = GuardCallback(console=False)
    _fit_gan(GAN(), [cb], max_steps=40)
    ckpt = {}
    cb.on_save_checkpoint(None, GAN(), ckpt)
    assert set(ckpt["trainguard_players"]) == {"G", "D"}
    again = GuardCallback(console=False)
    again.on_load_checkpoint(None, None, ckpt)
    _fit_gan(GAN(), [again], max_steps=2)
    assert [g.core.step_count for g in again.guards] == [21, 21]


class Tangled(GAN):
    """Two optimizers that do not split the module into players."""

    def configure_optimizers(self):
        return [torch.optim.Adam([*self.G.parameters(), *self.D[0].parameters()], lr=1e-3),
                torch.optim.Adam(list(self.D[2:].parameters()), lr=1e-3)]


def test_optimizers_that_split_no_submodule_guard_the_first_only():
    cb = GuardCallback(console=False)
    with pytest.warns(RuntimeWarning, match="only the first one is guarded"):
        _fit_gan(Tangled(), [cb], max_steps=100)
    assert cb.players == [] and len(cb.guards) == 1
    assert cb.guard.core.coupled
    # it decides at its own optimizer's steps only, on its own losses
    assert cb.guard.core.step_count == 50
    assert not cb.guard.findings and not cb.guard.actions


class TwoHeads(L.LightningModule):
    """Two optimizers on one backward pass (manual optimization): each trains one submodule."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_body, opt_head = self.optimizers()
        loss = nn.functional.mse_loss(self.head(self.body(x)), y)
        opt_body.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_body.step()
        opt_head.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.body.parameters(), lr=0.05),
                torch.optim.Adam(self.head.parameters(), lr=1e-3)]


def test_players_stepped_on_one_backward_pass_both_judge_its_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    cb = GuardCallback(console=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    trainer.fit(TwoHeads(), loader)
    body, head = cb.guards
    assert cb.players == ["body", "head"]
    assert body.core.step_count == head.core.step_count == 40
    assert [r.loss for r in head.history] == [r.loss for r in body.history]
    assert not body.findings and not head.findings


def test_a_checkpoint_of_the_other_layout_is_said_and_left_out():
    # one Guard's state into a run with players, and players' states into a one-Guard run
    single = {"trainguard": {"core": {}}}
    cb = GuardCallback(console=False)
    cb.on_load_checkpoint(None, None, single)
    with pytest.warns(RuntimeWarning, match="holds one Guard's state"):
        _fit_gan(GAN(), [cb], max_steps=2)
    assert [g.core.step_count for g in cb.guards] == [1, 1]
    cb2 = GuardCallback(console=False)
    cb2.on_load_checkpoint(None, None, {"trainguard_players": {"G": {}, "D": {}}})
    with pytest.warns(RuntimeWarning, match="states of players"):
        _fit_gan(Tangled(), [cb2], max_steps=2)
    assert cb2.players == [] and cb2.guard.core.step_count == 1
