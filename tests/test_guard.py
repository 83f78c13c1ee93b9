"""The Guard on small real training runs: healthy runs untouched, each action exercised."""
import math

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.report.jsonl import read_events

INTERVENTIONS = {"skip", "rollback", "lr_backoff", "halt"}


def mlp(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 10))


def train_digits(X, y, *, guarded, steps=300, opt="sgd", lr=0.1, bs=32, seed=0, inject=(),
                 guard_kwargs=None, model=None, hook=None):
    m = model if model is not None else mlp(seed)
    o = {"sgd": lambda: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
         "adam": lambda: torch.optim.Adam(m.parameters(), lr=lr),
         "adam_fused": lambda: torch.optim.Adam(m.parameters(), lr=lr, fused=True)}[opt]()
    g = tg.Guard(m, o, console=False, **(guard_kwargs or {})) if guarded else None
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for t in range(steps):
        idx = torch.randint(0, len(X), (bs,), generator=gen)
        xb = X[idx].clone()
        if t in inject:
            xb[0, 0] = float("nan")
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(xb), y[idx])
        loss.backward()
        if hook:
            hook(t, m, o)
        losses.append(loss.item())
        if g:
            g.step(loss)
        else:
            o.step()
    with torch.no_grad():
        acc = (m(X).argmax(1) == y).float().mean().item()
    return m, o, g, acc, losses


@pytest.mark.parametrize("opt,lr,bs", [("sgd", 0.1, 32), ("adam", 3e-3, 8)])
def test_healthy_run_is_identical_to_bare(digits, opt, lr, bs):
    X, y = digits
    mb, _, _, acc_b, _ = train_digits(X, y, guarded=False, opt=opt, lr=lr, bs=bs)
    mg, _, g, acc_g, _ = train_digits(X, y, guarded=True, opt=opt, lr=lr, bs=bs)
    assert not [f for f in g.findings if f.severe]
    assert not {a.kind for a in g.actions} & INTERVENTIONS
    assert acc_g == pytest.approx(acc_b, abs=0.01)
    if not g.actions:  # no clip either: bit-identical trajectory
        for a, b in zip(mb.parameters(), mg.parameters()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("sync,fused", [(True, False), (False, False), ("deferred", False),
                                        ("deferred", True)])
def test_nonfinite_step_is_a_true_skip(digits, sync, fused):
    X, y = digits
    snap = {}

    def hook(t, m, o):
        if t == 40:
            snap["params"] = [p.detach().clone() for p in m.parameters()]
            snap["state"] = [{k: v.clone() for k, v in o.state[p].items()} for p in m.parameters()]
        if t == 41:  # the update of step 40 must not have happened
            snap["after"] = [p.detach().clone() for p in m.parameters()]
            snap["state_after"] = [{k: v.clone() for k, v in o.state[p].items()} for p in m.parameters()]

    m, o, g, acc, _ = train_digits(X, y, guarded=True, opt="adam_fused" if fused else "adam",
                                   lr=1e-3, steps=60, inject={40}, hook=hook,
                                   guard_kwargs={"sync": sync})
    nf = [f for f in g.findings if f.kind == "nonfinite"]
    assert [f.step for f in nf] == [40]
    assert [a.kind for a in g.actions if a.step == 40] == ["skip"]
    for a, b in zip(snap["params"], snap["after"]):
        assert torch.equal(a, b)
    for s0, s1 in zip(snap["state"], snap["state_after"]):
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert acc > 0.6  # training went on (60 steps of Adam at 1e-3)


def test_skipped_step_does_not_advance_the_guard_owned_scheduler(digits):
    X, y = digits
    m = mlp()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9)
    g = tg.Guard(m, o, scheduler=sched, console=False)
    for t in range(5):
        o.zero_grad()
        xb = X[:32].clone()
        if t == 2:
            xb[0, 0] = float("nan")
        loss = nn.functional.cross_entropy(m(xb), y[:32])
        loss.backward()
        applied = g.step(loss)
        assert applied == (t != 2)
    assert sched.last_epoch == 4  # 4 applied updates
    assert o.param_groups[0]["lr"] == pytest.approx(0.1 * 0.9 ** 4)


def test_corrupted_parameters_roll_back_to_a_snapshot(digits):
    X, y = digits

    def hook(t, m, o):
        if t == 150:
            with torch.no_grad():
                m[2].weight[0, 0] = float("inf")

    m, o, g, acc, _ = train_digits(X, y, guarded=True, steps=200, hook=hook,
                                   guard_kwargs={"snapshot_every": 50})
    f = next(f for f in g.findings if f.kind == "nonfinite")
    assert f.step == 150 and f.origin == "parameters" and f.where == "2"
    rb = [a for a in g.actions if a.kind == "rollback"]
    assert rb and rb[0].detail["to_step"] == 100  # the newest snapshot older than the failing step
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert acc > 0.9


def test_lr_backoff_cooperates_with_scheduler(digits):
    X, y = digits
    m = mlp()
    seen_lrs = []

    class SpySGD(torch.optim.SGD):
        def step(self, closure=None):
            seen_lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    o = SpySGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.99)
    g = tg.Guard(m, o, console=False, policy=tg.Policy({"nonfinite": ("lr_backoff+skip",)}))
    for t in range(20):
        o.zero_grad()
        xb = X[:32].clone()
        if t == 5:
            xb[0, 0] = float("nan")
        loss = nn.functional.cross_entropy(m(xb), y[:32])
        loss.backward()
        g.step(loss)
        sched.step()
    assert g.lr_scale == 0.5
    # the scheduler's own value is untouched; the update used half of it
    assert o.param_groups[0]["lr"] == pytest.approx(0.1 * 0.99 ** 20)
    assert seen_lrs[-1] == pytest.approx(0.5 * 0.1 * 0.99 ** 19)
    assert seen_lrs[0] == pytest.approx(0.1)


def test_persistent_nan_halts_with_an_explanation(digits):
    X, y = digits
    m = mlp()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    g = tg.Guard(m, o, console=False, policy=tg.Policy(max_rollbacks=2))
    with pytest.raises(tg.TrainingUnstable) as ei:
        for t in range(100):
            o.zero_grad()
            xb = X[:32].clone()
            xb[:, 3] = float("nan")  # every batch is bad
            loss = nn.functional.cross_entropy(m(xb), y[:32])
            loss.backward()
            g.step(loss)
    err = ei.value
    assert isinstance(err, RuntimeError)
    msg = str(err)
    assert "halted training" in msg and "What to change" in msg and "rollbacks" in msg
    assert err.findings and err.findings[0].kind == "nonfinite"
    kinds = [a.kind for a in g.actions]
    assert kinds.count("skip") == 2 and kinds.count("rollback") == 2 and kinds[-1] == "halt"
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_gradient_explosion_is_clipped(digits):
    X, y = digits

    def hook(t, m, o):
        if t == 120:
            for p in m.parameters():
                p.grad.mul_(1e4)

    m, o, g, acc, _ = train_digits(X, y, guarded=True, steps=160, hook=hook)
    f = [f for f in g.findings if f.kind == "grad_explosion"]
    assert f and f[0].step == 120 and f[0].where
    clip = [a for a in g.actions if a.kind == "clip" and a.step == 120]
    assert clip and clip[0].detail["threshold"] < clip[0].detail["norm"] / 100
    assert acc > 0.9


def test_records_are_bounded_and_counts_are_not(digits, tmp_path):
    """Bug: guard.findings/actions grew without bound (a long run clipping every step keeps
    one Action per step). They now hold the most recent keep_records; the counters, the
    summary and the JSONL log still see everything."""
    X, y = digits
    log = tmp_path / "run.jsonl"
    _, _, g, _, _ = train_digits(X, y, guarded=True, steps=120,
                                 guard_kwargs={"clip": 0.01, "keep_records": 20, "log": str(log)})
    n = g.action_counts["clip"]
    assert n >= 100 and len(g.actions) <= 20 + 20 // 10 + 1
    assert g.actions[-1].step == 119
    assert f"action clip: {n}x, first at step 0" in g.summary()
    state = g.state_dict()
    m2 = mlp()
    g2 = tg.Guard(m2, torch.optim.SGD(m2.parameters(), lr=0.1), console=False)
    g2.load_state_dict(state)
    assert g2.action_counts["clip"] == n  # (bug: resuming with another clip= raised KeyError)
    from trainguard.report import read_events
    assert sum(1 for e in read_events(log) if e.get("type") == "action") == n


def test_fixed_and_agc_clipping(digits):
    X, y = digits
    _, _, g, acc, _ = train_digits(X, y, guarded=True, steps=50, guard_kwargs={"clip": 0.5})
    assert any(a.kind == "clip" for a in g.actions) and acc > 0.8
    _, _, g, acc, _ = train_digits(X, y, guarded=True, steps=50, guard_kwargs={"clip": "agc"})
    assert any(a.kind == "clip" and "agc" in a.reason for a in g.actions)


def test_loss_spike_from_a_bad_batch_is_skipped(digits):
    X, y = digits
    m = mlp()
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, o, console=False)
    gen = torch.Generator().manual_seed(3)
    for t in range(200):
        idx = torch.randint(0, len(X), (32,), generator=gen)
        xb = X[idx] * (300.0 if t == 150 else 1.0)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(xb), y[idx])
        loss.backward()
        g.step(loss)
    spikes = [f for f in g.findings if f.kind == "loss_spike"]
    assert spikes and spikes[0].step == 150
    assert any(a.kind == "skip" and a.step == 150 for a in g.actions)


def test_amp_fp16_overflowing_initial_scale_is_not_instability():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    o = torch.optim.SGD(m.parameters(), lr=0.05)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    g = tg.Guard(m, o, scaler=sc, console=False)
    x = torch.randn(256, 16)
    y = 2 * x[:, :1]
    for _ in range(80):
        o.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(m(x), y)
        sc.scale(loss).backward()
        g.step(loss)
    assert g.counts["scaler_overflow"] > 10
    assert not g.findings
    assert not g.actions
    assert loss.item() < 0.5
    assert sc.get_scale() < 2.0 ** 40


def test_bf16_autocast_healthy():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    o = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = tg.Guard(m, o, console=False)
    x = torch.randn(256, 16)
    y = x[:, :1] - x[:, 1:2]
    for _ in range(150):
        o.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(m(x).float(), y)
        loss.backward()
        g.step(loss)
    assert not [f for f in g.findings if f.severe] and not g.actions
    assert loss.item() < 0.1


def test_jsonl_log_keeps_nan(digits, tmp_path):
    X, y = digits
    log = tmp_path / "events.jsonl"
    _, _, g, _, _ = train_digits(X, y, guarded=True, steps=30, inject={12},
                                 guard_kwargs={"log": str(log), "log_every": 5})
    g.close()
    events = list(read_events(log))
    f = [e for e in events if e["type"] == "finding"]
    assert f and f[0]["kind"] == "nonfinite" and math.isnan(f[0]["evidence"]["loss"])
    stats = [e for e in events if e["type"] == "stats"]
    assert any(e["step"] == 12 and math.isnan(e["loss"]) for e in stats)
    assert "NaN" in log.read_text()  # plain-JSON spelling, nothing dropped
    assert events[-1]["type"] == "summary"


def test_state_dict_resumes_statistics(digits):
    X, y = digits
    _, _, g, _, _ = train_digits(X, y, guarded=True, steps=80, inject={30})
    state = g.state_dict()
    m = mlp()
    g2 = tg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.1), console=False)
    g2.load_state_dict(state)
    assert g2.step_count == 80
    assert g2.state_dict()["detectors"] == state["detectors"]
    assert [f.kind for f in g2.findings] == ["nonfinite"]
    import json
    json.dumps(state)  # plain Python values only
    with pytest.raises(ValueError, match="Guard.state_dict"):
        g2.load_state_dict({"nope": 1})


def test_summary_and_console(digits, capsys):
    X, y = digits
    m = mlp()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    g = tg.Guard(m, o)
    for t in range(3):
        o.zero_grad()
        xb = X[:16].clone()
        if t == 1:
            xb[0, 0] = float("nan")
        loss = nn.functional.cross_entropy(m(xb), y[:16])
        loss.backward()
        g.step(loss)
    g.close()
    err = capsys.readouterr().err
    assert "step 1: nonfinite" in err and "step 1: skip" in err
    assert "trainguard summary: 3 steps, 2 updates applied" in g.summary()


def test_bad_input_is_rejected_clearly():
    m = mlp()
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tg.Guard("model", o)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        tg.Guard(m, "sgd")
    with pytest.raises(ValueError, match="clip must be"):
        tg.Guard(m, o, clip="bogus")
    with pytest.raises(ValueError, match="sample_every"):
        tg.Guard(m, o, sample_every=0)
    with pytest.raises(ValueError, match="unknown action"):
        tg.Policy({"nonfinite": ("explode",)})
    with pytest.raises(ValueError, match="unknown finding kinds"):
        tg.Policy(halt_on=("boom",))
    with pytest.raises(ValueError, match="names no finding kind"):
        tg.Policy({"dead_unit:killed": ("skip",)})
    with pytest.raises(ValueError, match="sequence of rungs"):
        tg.Policy({"nonfinite": "skip"})
    g = tg.Guard(m, o, console=False)
    with pytest.raises(ValueError, match="scalar loss"):
        g.step(torch.ones(3))
    with pytest.raises(TypeError, match="loss"):
        g.step("0.3")
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no trainable parameter"):
        tg.Guard(other, o)


def test_sync_false_on_cpu_takes_the_default_path(digits):
    """On the CPU the device is the host: sync=False decides at the step like the default,
    without the deferred mode's backup copies (it cost 1.3-2x the default there)."""
    m = mlp()
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, o, console=False, sync=False)
    assert g.deferred is False and g.sync is False
    m2 = mlp()
    assert tg.Guard(m2, torch.optim.SGD(m2.parameters(), lr=0.1), console=False,
                    sync="deferred").deferred is True
    with pytest.raises(ValueError, match="sync must be"):
        tg.Guard(m, o, console=False, sync="yes")
    g.close()


def test_accumulation_with_observe_loss_records_the_mean_micro_batch_loss():
    """The README's accumulation loop: ``observe_loss`` on each micro-batch's own loss, one
    ``guard.step()``: the record holds their mean on the loss's own scale, the chance level is
    recognised, and a NaN micro-batch makes the whole step a skip."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 10))
    o = torch.optim.SGD(m.parameters(), lr=0.05)
    g = tg.Guard(m, o, console=False)
    gen = torch.Generator().manual_seed(0)
    accum = 4
    means = []
    for step in range(12):
        o.zero_grad()
        losses = []
        for micro in range(accum):
            x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
            if step == 7 and micro == 2:
                x[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(m(x), y)
            (loss / accum).backward()
            g.observe_loss(loss)
            losses.append(float(loss.detach()))
        means.append(sum(losses) / accum)
        g.step()
    g.close()
    recorded = [s.loss for s in g.history]
    assert recorded[:7] == pytest.approx(means[:7], rel=1e-6)
    assert g.chance_loss == pytest.approx(math.log(10))
    assert [a.step for a in g.actions if a.kind == "skip"] == [7]
