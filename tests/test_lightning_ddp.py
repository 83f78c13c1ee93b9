"""Lightning DDP, 2 processes on gloo (issue #10, item 3): both ranks take the same decisions."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")
from trainguard.integrations.lightning import GuardCallback  # noqa: E402

pytestmark = pytest.mark.dist
warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
        self.calls = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.calls == 15 and self.global_rank == 1:  # a NaN on one rank only
            x = x.clone()
            x[0, 0] = float("nan")
        self.calls += 1
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Dump(GuardCallback):
    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        g = self.guard
        rec = {"actions": [(a.step, a.kind) for a in g.actions],
               "findings": [(f.step, f.kind) for f in g.findings],
               "params": [p.detach().sum().item() for p in pl_module.parameters()]}
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as fh:
            json.dump(rec, fh)
        super().on_fit_end(trainer, pl_module)


def test_ddp_two_ranks_take_the_same_decisions(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    ds = torch.utils.data.TensorDataset(x, (x[:, :3].sum(1) > 0).long())
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    trainer = L.Trainer(max_steps=25, accelerator="cpu", devices=2,
                        strategy=L.strategies.DDPStrategy(process_group_backend="gloo",
                                                          start_method="spawn"),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[Dump(str(tmp_path), console=False)])
    trainer.fit(Net(), loader)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["actions"] == r1["actions"] and r0["findings"] == r1["findings"]
    assert [15, "skip"] in r0["actions"]
    assert r0["params"] == pytest.approx(r1["params"])
    assert all(v == v for v in r0["params"])  # finite (no NaN)
