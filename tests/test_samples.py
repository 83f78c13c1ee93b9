"""Sample attribution: the ids of a bad step's batch, the rows to blame, the file a resumed
run skips them with (trainguard.samples)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.samples import MAX_SUSPECTS, SampleLedger, SkipSamples, load_bad_samples
from trainguard.sinks.console import ConsoleSink
from trainguard.types import Finding


def _finding(kind: str = "loss_spike", origin: str | None = None) -> Finding:
    return Finding(kind=kind, step=5, message="x", origin=origin)


class _Untouchable:
    """A 1-D id container that fails if anything reads its elements."""
    shape = (4,)

    def tolist(self):
        raise AssertionError("the ids of a healthy step were read")


# ---------------------------------------------------------------- the ledger on synthetic steps
def test_a_healthy_step_reads_nothing_and_keeps_nothing():
    led = SampleLedger()
    for t in range(50):
        led.offer(t, _Untouchable(), _Untouchable())
        assert led.judge(t, []) is None
        assert led.judge(t, [Finding(kind="plateau", step=t, message="m", severity="info")]) is None
    assert led.pending == {} and led.count == 0


def test_steps_never_decided_are_dropped():
    led = SampleLedger()
    for t in range(100):
        led.offer(t, [t])  # a framework that never calls the decision
    assert len(led.pending) <= 6


def test_non_finite_rows_are_the_suspects():
    led = SampleLedger()
    led.offer(5, [10, 11, 12, 13], [0.1, float("nan"), 0.2, float("inf")])
    f = _finding("nonfinite")
    bad = led.judge(5, [f])
    assert bad is not None and bad.kinds == ("nonfinite",)
    assert bad.suspect_ids == (11, 13) and bad.suspect_losses == (None, float("inf"))
    assert f.evidence["sample_ids"] == [10, 11, 12, 13] and f.evidence["suspect_ids"] == [11, 13]
    assert "2 of 4 rows" in f.evidence["suspect_reason"]


def test_a_batch_gone_non_finite_as_a_whole_names_no_row():
    led = SampleLedger()
    led.offer(5, list(range(32)), [float("nan")] * 30 + [0.1, 0.2])
    bad = led.judge(5, [_finding("nonfinite")])
    assert bad is not None and bad.suspect_ids == () and "not a few rows" in bad.reason


def test_one_outlier_row_carries_the_spike():
    losses = [1.0] * 31 + [500.0]
    led = SampleLedger()
    led.offer(5, np.arange(100, 132), np.asarray(losses))
    bad = led.judge(5, [_finding()])
    assert bad is not None and bad.suspect_ids == (131,) and bad.suspect_losses == (500.0,)


def test_an_evenly_high_batch_names_no_row():
    rng = np.random.default_rng(0)
    losses = rng.uniform(5.0, 6.0, 64)
    led = SampleLedger()
    led.offer(5, list(range(64)), losses)
    bad = led.judge(5, [_finding()])
    assert bad is not None and bad.suspect_ids == () and bad.sample_ids == tuple(range(64))
    assert "no row stands out" in bad.reason
    assert MAX_SUSPECTS < 32


def test_the_micro_batch_far_above_the_others_is_named():
    led = SampleLedger()
    for k, loss in enumerate([1.0, 1.2, 40.0, 0.9]):
        led.offer(5, [k * 10, k * 10 + 1], loss=torch.tensor(loss))
    bad = led.judge(5, [_finding()])
    assert bad is not None and bad.suspect_ids == (20, 21)
    assert "micro-batch 3 of 4" in bad.reason
    for k, loss in enumerate([1.0, float("nan"), float("nan")]):
        led.offer(7, [k], loss=loss)
    bad = led.judge(7, [_finding("nonfinite")])
    assert bad is not None and bad.suspect_ids == () and "2 of 3 micro-batches" in bad.reason
    led.offer(6, [1], loss=1.0)
    led.offer(6, [2], loss=1.5)  # not 2.5x the next highest: nobody named
    bad = led.judge(6, [_finding()])
    assert bad is not None and bad.suspect_ids == () and bad.sample_ids == (1, 2)


def test_weights_already_non_finite_are_not_the_batch_s_fault():
    led = SampleLedger()
    led.offer(5, [1, 2])
    assert led.judge(5, [_finding("nonfinite", origin="parameters")]) is None
    led.offer(6, [1, 2])
    assert led.judge(6, [Finding(kind="divergence", step=6, message="m", severity="critical")]) is None


@pytest.mark.parametrize("ids, losses, err", [
    (torch.zeros(2, 3), None, "1-D"),
    ("abc", None, "dataset indices"),
    (7, None, "dataset indices"),
    ([1, 2, 3], [0.1, 0.2], "sample_losses has 2 values but sample_ids has 3"),
    (None, [0.1], "sample_losses needs sample_ids"),
    ([1, 2], "xy", "per-row losses"),
])
def test_bad_ids_get_a_clear_error(ids, losses, err):
    m = nn.Linear(3, 1)
    g = tg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.1), console=False)
    m(torch.randn(2, 3)).sum().backward()
    with pytest.raises((TypeError, ValueError), match=err):
        g.step(torch.tensor(1.0), sample_ids=ids, sample_losses=losses)
    g.close()


# ---------------------------------------------------------------- a real training loop
def _data(n: int = 512, nan_row: int | None = None, wrong_row: int | None = None):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = x.sum(1, keepdim=True)
    if nan_row is not None:
        x[nan_row, 2] = float("nan")
    if wrong_row is not None:
        y[wrong_row] = 300.0  # a mislabelled row
    return x, y


def _train(g, m, opt, x, y, order, batch=32, per_row=True):
    for b in range(len(order) // batch):
        idx = order[b * batch:(b + 1) * batch]
        opt.zero_grad(set_to_none=True)
        rows = (m(x[idx]) - y[idx]).pow(2).squeeze(1)
        loss = rows.mean()
        loss.backward()
        g.step(loss, sample_ids=idx, sample_losses=rows if per_row else None)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def _guarded(**kw):
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    return m, opt, tg.Guard(m, opt, console=False, **kw)


@pytest.mark.parametrize("sync", [True, "deferred"])
def test_a_nan_row_is_named_written_down_and_skipped_on_resume(tmp_path, sync):
    x, y = _data(nan_row=300)
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = tg.Guard(m, opt, console=False, checkpoint_dir=tmp_path, sync=sync,
                 log=tmp_path / "run.jsonl")
    order = torch.randperm(512, generator=torch.Generator().manual_seed(1))
    _train(g, m, opt, x, y, order)
    assert [b.suspect_ids for b in g.bad_batches] == [(300,)]
    bad = g.bad_batches[0]
    assert bad.kinds == ("nonfinite",) and "skip" in bad.actions
    assert set(bad.sample_ids) == set(order[bad.step * 32:(bad.step + 1) * 32].tolist())
    f = next(f for f in g.findings if f.kind == "nonfinite")
    assert f.evidence["suspect_ids"] == [300] and f.evidence["sample_count"] == 32
    assert "bad batches: 1, suspect samples [300]" in g.summary()
    printed = io.StringIO()
    ConsoleSink(printed).on_event("bad_batch", bad.step, {"message": bad.describe()})
    assert f"trainguard step {bad.step}: bad batch (nonfinite; skip): 32 samples" in printed.getvalue()
    g.close()
    events = [json.loads(line) for line in open(tmp_path / "run.jsonl")]
    ev = [e for e in events if e["type"] == "bad_batch"]
    assert len(ev) == 1 and ev[0]["suspect_ids"] == [300] and "suspects [300]" in ev[0]["message"]
    path = tmp_path / "bad_samples.json"
    assert load_bad_samples(path) == {300}
    assert load_bad_samples(path, whole_batches=True) == set(bad.sample_ids)
    # the resumed run leaves the row out: no finding at all
    skip = SkipSamples(torch.utils.data.SequentialSampler(range(512)), load_bad_samples(path))
    assert len(skip) == 511
    order2 = torch.tensor(list(skip))
    assert 300 not in order2.tolist() and skip.skipped == 1
    m2 = _model()
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    g2 = tg.Guard(m2, opt2, console=False, sync=sync)
    _train(g2, m2, opt2, x, y, order2[:480])
    assert g2.findings == [] and g2.bad_batches == []
    g2.close()


def test_a_mislabelled_row_behind_a_loss_spike_is_named():
    x, y = _data(n=2048, wrong_row=1500)
    m, opt, g = _guarded()
    _train(g, m, opt, x, y, torch.arange(2048))
    assert len(g.bad_batches) == 1
    bad = g.bad_batches[0]
    assert bad.step == 1500 // 32 and "loss_spike" in bad.kinds
    assert bad.suspect_ids == (1500,) and bad.suspect_losses[0] > 1e4
    g.close()


def test_ids_without_per_row_losses_name_the_batch_and_accumulation_names_the_micro_batch():
    x, y = _data(n=2048, wrong_row=1500)
    m, opt, g = _guarded()
    for b in range(32):
        opt.zero_grad(set_to_none=True)
        for k in range(4):
            idx = list(range((b * 4 + k) * 16, (b * 4 + k + 1) * 16))
            loss = (m(x[idx]) - y[idx]).pow(2).mean()
            (loss / 4).backward()
            g.observe_loss(loss, sample_ids=idx)
        g.step()
    assert len(g.bad_batches) == 1
    bad = g.bad_batches[0]
    assert bad.sample_ids == tuple(range(1472, 1536))
    assert bad.suspect_ids == tuple(range(1488, 1504))  # the micro-batch holding row 1500
    assert "micro-batch 2 of 4" in bad.reason
    g.close()


def test_the_bad_batches_survive_a_checkpoint(tmp_path):
    x, y = _data(nan_row=7)
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = tg.Guard(m, opt, console=False)
    _train(g, m, opt, x, y, torch.arange(512))
    state = g.state_dict()
    g.close()
    m2 = _model()
    g2 = tg.Guard(m2, torch.optim.Adam(m2.parameters(), lr=1e-2), console=False)
    g2.load_state_dict(state)
    assert [b.to_dict() for b in g2.bad_batches] == [b.to_dict() for b in g.bad_batches]
    assert g2.bad_batches[0].suspect_ids == (7,)
    out = g2.save_bad_samples(tmp_path / "b.json")
    assert load_bad_samples(out) == {7}
    g2.close()


def test_the_bad_samples_file_is_checked(tmp_path):
    p = tmp_path / "other.json"
    p.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a trainguard bad-samples file"):
        load_bad_samples(p)


def test_the_monitor_takes_ids_too():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4))
    y = x @ np.ones(4)
    x[100] = np.nan
    w = np.zeros(4)
    mon = tg.Monitor(params={"w": w})
    for b in range(8):
        idx = np.arange(b * 32, (b + 1) * 32)
        r = x[idx] @ w - y[idx]
        rows = r ** 2
        gw = 2 * x[idx].T @ r / len(idx)
        d = mon.step(float(rows.mean()), grads={"w": gw}, lr=0.1, sample_ids=idx,
                     sample_losses=rows)
        if d.apply:
            w -= 0.1 * d.lr_scale * d.clip_scale * gw
    assert [b.suspect_ids for b in mon.bad_batches] == [(100,)]
    assert np.isfinite(w).all()


def test_inputs_are_checked_at_the_first_step_and_a_later_bad_one_never_breaks_a_step():
    led = SampleLedger()
    led.offer(0, [1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="1-D"):  # another type: checked again
        led.offer(1, torch.zeros(2, 2))
    led.offer(1, [[1, 2], [3, 4]])  # same types as checked: held as is ...
    f = _finding("nonfinite")
    bad = led.judge(1, [f])  # ... and read on the bad step: no exception, the reason says why
    assert bad is not None and bad.sample_ids == () and "1-D" in bad.reason
    assert "1-D" in f.evidence["sample_error"]
    led = SampleLedger()
    led.offer(1, [1, 2], [0.1, 0.2])
    led.offer(2, [1, 2, 3], [0.1, 0.2])
    bad = led.judge(2, [_finding()])
    assert bad is not None and bad.sample_ids == (1, 2, 3) and "do not line up" in bad.reason


def test_the_report_shows_the_bad_batch_in_words(tmp_path):
    from trainguard.report.html import save_report
    x, y = _data(nan_row=300)
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = tg.Guard(m, opt, console=False, log=tmp_path / "run.jsonl")
    _train(g, m, opt, x, y, torch.arange(512))
    g.close()
    text = open(save_report(tmp_path / "run.jsonl", tmp_path / "run.html"), encoding="utf-8").read()
    assert "<td>bad_batch</td><td>bad batch (nonfinite; skip): 32 samples [288, 289" in text
    assert "suspects [300]" in text and "&quot;sample_ids&quot;" not in text


def test_ids_of_every_kind_are_written_as_plain_json_and_memory_stays_bounded(tmp_path):
    led = SampleLedger(keep=3)
    for t in range(10):
        led.offer(t, [np.int64(t), torch.tensor(100 + t), f"row-{t}", 7.0],
                  [0.1, 0.1, 0.1, float("nan")])
        bad = led.judge(t, [_finding("nonfinite")])
        led.record(bad)
    assert led.batches[-1].sample_ids == (9, 109, "row-9", 7)
    assert len(led.batches) == 3 and led.count == 10 and led.suspects == {7}
    path = led.save(tmp_path / "b.json")
    doc = json.load(open(path))
    assert doc["bad_batches"] == 10 and len(doc["batches"]) == 3
    assert load_bad_samples(path) == {7}
    assert len(load_bad_samples(path, whole_batches=True)) == 30  # 0-9 (7 twice), 100-109, 10 keys
    state = json.loads(json.dumps(led.state_dict()))
    again = SampleLedger(keep=3)
    again.load_state_dict(state)
    assert again.count == 10 and again.rows == led.rows and again.suspects == {7}
