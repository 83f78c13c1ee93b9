"""Nothing lost (issue #12): guard.step's return value is the truth, and a norm that overflows
fp32 is not the loss scaler's own skip. Each test fails on the code before the fix."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import trainguard as tg


def test_fp32_norm_overflow_is_not_a_scaler_skip_and_return_value_is_the_truth():
    """fp16 autocast + GradScaler; at step 30 one weight's gradient is multiplied by 1e20
    (values ~1e19: finite, but their fp32 squared norm overflows to inf). Before the fix the
    Guard took it for the scaler's overflow skip (no finding, no clip, step returned False)
    while scaler.step saw finite values and applied the unclipped update."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    g = tg.Guard(m, o, scaler=sc, console=False)
    for t in range(40):
        x, y = torch.randn(32, 64), torch.randn(32, 1)
        o.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(x)
        loss = nn.functional.mse_loss(out.float(), y)
        sc.scale(loss).backward()
        if t == 30:
            m[0].weight.grad.mul_(1e20)
        before = [p.detach().clone() for p in m.parameters()]
        applied = g.step(loss)
        changed = any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
        assert applied == changed, f"step {t}: guard.step returned {applied}, update applied: {changed}"
    f = [x for x in g.findings if x.step == 30]
    assert f and f[0].kind == "grad_explosion", [str(x) for x in g.findings]
    assert any(a.kind == "clip" and a.step == 30 for a in g.actions)
    assert g.counts.get("scaler_overflow", 0) == 0
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in m.parameters())


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))


def _bn_run(poison, **kw):
    m = _bn_net()
    o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = tg.Guard(m, o, console=False, **kw)
    gen = torch.Generator().manual_seed(0)
    for t in range(60):
        x = torch.randn(32, 8, generator=gen)
        y = (x[:, 0] > 0).long()
        x = poison(t, x)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        g.step(loss)
    m.eval()
    with torch.no_grad():
        out = m(torch.randn(64, 8, generator=gen))
    return m, g, out


@pytest.mark.parametrize("sync", [True, "deferred"])
def test_a_skipped_nan_batch_leaves_batchnorm_running_stats_finite(sync):
    """Before the fix the NaN batch was skipped as promised but its forward pass had written
    NaN into running_mean/var: eval-mode outputs were NaN at the end of the run (with
    ``sync=False`` the device-side skip left them NaN until the fix that restores them when the
    host reads the skipped step)."""
    def nan_at_20(t, x):
        if t == 20:
            x = x.clone()
            x[3, 2] = float("nan")
        return x
    m, g, out = _bn_run(nan_at_20, sync=sync)
    g.close()
    assert any(a.kind == "skip" and a.step == 20 for a in g.actions)
    assert torch.isfinite(m[1].running_mean).all() and torch.isfinite(m[1].running_var).all()
    assert torch.isfinite(out).all()


def test_running_stats_overflowed_by_a_huge_finite_batch_are_found_and_restored():
    """A batch of finite but huge values (1e20) overflows the running variance while the
    normalised output, and so the loss, stays finite: nothing was skipped, nothing said."""
    def huge_at_23(t, x):
        return x * 1e20 if t == 23 else x
    m, g, out = _bn_run(huge_at_23)
    f = [x for x in g.findings if x.kind == "nonfinite" and x.origin == "buffers"]
    assert f and f[0].where == "1" and 23 <= f[0].step <= 30, [str(x) for x in g.findings]
    assert torch.isfinite(m[1].running_var).all()
    assert torch.isfinite(out).all()


def test_bundles_and_reports_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """A rename without fsync can be persisted before the data it points to: after a power
    loss, a renamed but empty file. Every file and folder of a bundle is fsynced before the
    rename, the parent folder after it; the same for atomic text writes (issue #12, item 11)."""
    import os

    from trainguard import _fsio
    from trainguard.locate import _bundle
    from trainguard.locate._replay import Location

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):  # record which path each fsync reached
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    renamed: list[tuple[str, list[str]]] = []
    real_replace = os.replace

    def spy_replace(a, b):
        renamed.append((os.fspath(b), list(synced)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", spy)
    monkeypatch.setattr(os, "replace", spy_replace)
    m = nn.Linear(3, 2)
    loc = Location("forward", "", "test", evidence={})
    path = _bundle.write_bundle(str(tmp_path / "b"), step=3, location=loc, model=m,
                                args=(torch.randn(2, 3),), kwargs={}, grad_outputs=[],
                                rng=None, cuda_rng=None, autocast=None, training=True,
                                grad_enabled=True)
    final, before = renamed[-1]
    assert final == path
    assert any(p.endswith("manifest.json") for p in before)
    assert any(p.endswith(os.path.basename(path)) or ".tmp" in p for p in before)  # the folder
    assert synced[-1] == str(tmp_path / "b")  # the parent folder, after the rename
    synced.clear()
    _fsio.atomic_write(tmp_path / "r.txt", lambda fh: fh.write("x"))
    assert (tmp_path / "r.txt").read_text() == "x"
    assert len(synced) == 2 and synced[-1] == str(tmp_path)


def test_huge_finite_weights_are_named_as_such_not_nan_nor_another_rank():
    """Weights of 1e30 keep the loss finite here (ReLU cut) but their fp32 norm overflows;
    before the fix the finding said "parameters hold NaN/Inf" and locate blamed "another rank"
    in a single-process run."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    o = torch.optim.SGD(m.parameters(), lr=0.01)
    g = tg.Guard(m, o, console=False, param_norm_every=1)
    for t in range(15):
        if t == 10:
            with torch.no_grad():
                m[0].weight[0, :] = 1e30
                m[0].bias[0] = -1e31  # unit 0 never fires: the loss stays finite
        x = torch.randn(16, 8)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
        loss.backward()
        g.step(loss)
    f = next(x for x in g.findings if x.kind == "nonfinite")
    assert f.step == 10 and f.where == "0" and "finite but huge" in f.message, str(f)
    assert "another rank" not in f.message and "NaN/Inf" not in f.message.split(":")[0]
    assert any(a.kind == "rollback" and a.step == 10 for a in g.actions)
    assert all(p.abs().max() < 1e3 for p in m.parameters())


def _loop(misuse, steps=12, frozen=False):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    if frozen:  # a frozen first layer still handed to the optimizer: no gradient there
        m[0].requires_grad_(False)
    o = torch.optim.SGD(m.parameters(), lr=0.05)
    g = tg.Guard(m, o, console=False)
    for t in range(steps):
        x = torch.randn(16, 4)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
        if misuse != "no_backward" or t != 5:
            loss.backward()
        g.step(loss)
        if misuse == "double_update" and t == 5:
            o.step()
        if misuse == "stale_gradients" and t == 5:
            g.step(loss)
    return g




@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("misuse", ["double_update", "stale_gradients", "no_backward"])
def test_loop_misuse_is_said_once_and_clearly(misuse, frozen):
    """Before the fix each of these passed without a word (issue #12, item 6). With a frozen
    first layer the checks read the first parameter that has a gradient."""
    with pytest.warns(RuntimeWarning, match="trainguard") as rec:
        g = _loop(misuse, frozen=frozen)
    msgs = [str(w.message) for w in rec if "trainguard" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert g.counts["loop_misuse"] == 1
    key = {"double_update": "outside the Guard", "stale_gradients": "without a new backward",
           "no_backward": "no parameter has a gradient"}[misuse]
    assert key in msgs[0]


def test_a_correct_loop_raises_no_misuse_warning(recwarn):
    for frozen in (False, True):
        g = _loop("none", steps=30, frozen=frozen)
        assert not [w for w in recwarn if "trainguard" in str(w.message)]
        assert g.counts.get("loop_misuse", 0) == 0
    # gradient accumulation (two backwards per step) is not stale
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    o = torch.optim.SGD(m.parameters(), lr=0.05)
    g2 = tg.Guard(m, o, console=False)
    for _ in range(10):
        o.zero_grad(set_to_none=False)
        for _ in range(2):
            x = torch.randn(8, 4)
            (nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long()) / 2).backward()
        g2.step(torch.tensor(1.0))
    assert g2.counts.get("loop_misuse", 0) == 0


@pytest.mark.parametrize("opt_name,key", [("Adam", "exp_avg_sq"), ("AdamW", "exp_avg_sq"),
                                          ("RMSprop", "square_avg"), ("Adagrad", "sum")])
def test_inf_in_the_optimizer_state_is_found_and_rolled_back(opt_name, key):
    """Inf in an adaptive optimizer's state freezes that weight silently (its update is
    m / sqrt(inf) = 0) with a finite loss: before the fix nothing was said (issue #12 item 3)."""
    def freeze(m, o):
        o.state[m[2].weight][key][0, 0] = float("inf")
    m, o, g = _adaptive_run(opt_name, 40, 13, freeze)
    f = next(x for x in g.findings if x.kind == "nonfinite")
    assert f.origin == "optimizer" and f.where == "2" and 14 <= f.step <= 20, str(f)
    assert any(a.kind == "rollback" and a.step == f.step for a in g.actions)
    assert all(torch.isfinite(v).all() for st in o.state.values() for v in st.values()
               if torch.is_tensor(v))


class _RNNLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(20, 16), nn.GRU(16, 16, batch_first=True), nn.Linear(16, 20)

    def forward(self, x, h):  # type: ignore[no-untyped-def]
        o, h = self.rnn(self.emb(x), h)
        return self.out(o), h


def _rnn_lm_run(reset: bool):
    """The PyTorch examples' loop: the hidden state is fed back (detached) from the previous
    batch. A NaN planted in it at step 3 poisons every later step unless the loop resets it."""
    torch.manual_seed(0)
    m = _RNNLM()
    o = torch.optim.SGD(m.parameters(), lr=0.5)
    state = {"h": torch.zeros(1, 8, 16)}

    def reset_hidden(action):
        state["h"] = torch.zeros(1, 8, 16)

    g = tg.Guard(m, o, console=False, on_reset=reset_hidden if reset else None)
    gen = torch.Generator().manual_seed(0)
    try:
        for t in range(40):
            x = torch.randint(0, 20, (8, 12), generator=gen)
            y = torch.roll(x, -1, 1)
            h = state["h"].detach()
            if t == 3:
                h = h.clone()
                h[0, 0, 0] = float("nan")
            o.zero_grad()
            out, state["h"] = m(x, h)
            loss = nn.functional.cross_entropy(out.reshape(-1, 20), y.reshape(-1))
            loss.backward()
            g.step(loss)
    except tg.TrainingUnstable:
        pass
    return g


def test_the_loop_can_reset_its_own_state_on_a_skip():
    """Before on_reset, the poisoned hidden state cost rollbacks and LR backoffs for nothing
    (issue #12 item 10: eight rollbacks and a halt in the PyTorch word LM)."""
    bare = _rnn_lm_run(reset=False)
    assert bare.action_counts["rollback"] >= 1 or bare.action_counts["halt"] >= 1
    g = _rnn_lm_run(reset=True)
    assert [a.kind for a in g.actions] == ["skip"] and g.actions[0].step == 3
    assert g.action_counts.get("rollback", 0) == 0 and g.lr_scale == 1.0


def _a_bundle(tmp_path):
    from trainguard.locate import StepCapture
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cap = StepCapture(m, bundle_dir=tmp_path / "b", model_factory="evil:make")
    with torch.no_grad():
        m[2].weight[0] = float("inf")
    from trainguard.types import Finding
    x = torch.randn(3, 4)
    loss = nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 0]))
    loss.backward()
    f = cap.refine(Finding(kind="nonfinite", step=0, message="", origin="parameters"), m, None)
    return f.evidence["bundle"]


def test_untrusted_bundles_run_no_code(tmp_path, monkeypatch, capsys):
    """Before: replay imported the manifest's model_factory, and from inside the bundle's folder
    a Python file shipped in it ran (issue #12 item 8)."""
    import json
    import os

    from trainguard.cli import main
    from trainguard.locate import Bundle, BundleError
    path = _a_bundle(tmp_path)
    flag = tmp_path / "ran"
    with open(os.path.join(path, "evil.py"), "w") as fh:
        fh.write(f"open({str(flag)!r}, 'w').write('x')\ndef make():\n    raise SystemExit\n")
    monkeypatch.chdir(path)
    assert main(["replay", path]) == 2
    assert "--trust-bundle" in capsys.readouterr().err
    assert main(["replay", path, "--trust-bundle"]) == 2  # never imported from the bundle
    assert not flag.exists()
    # a manifest whose file entries leave the bundle is refused
    man = json.load(open(os.path.join(path, "manifest.json")))
    man["files"]["model"] = "../../secret.safetensors"
    json.dump(man, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle(path)


def test_the_guards_hooks_do_not_travel_with_the_model(tmp_path):
    """torch.save(model) / torch.load(weights_only=True), copy.deepcopy and AveragedModel (EMA)
    at every step of a guarded run, sampled steps included: before the fix saving failed
    ("Can't pickle local object 'ActivationSampler._hook.<locals>.hook'", or a weights-only
    load hit "Unsupported global") and copies carried the Guard's hooks (issue #12 item 9)."""
    import copy

    from torch.optim.swa_utils import AveragedModel
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    g = tg.Guard(m, o, console=False, sample_every=3)
    ema = AveragedModel(m)
    torch.serialization.add_safe_globals([nn.Sequential, nn.Linear, nn.ReLU])
    for t in range(8):
        x = torch.randn(8, 4)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
        loss.backward()
        g.step(loss)
        ema.update_parameters(m)
        path = tmp_path / f"m{t}.pt"
        torch.save(m, path)
        back = torch.load(path, weights_only=True)
        assert torch.equal(back[0].weight, m[0].weight)
        c = copy.deepcopy(m)
        assert not c._forward_pre_hooks and not c._forward_hooks
        assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in c.modules())
    assert not ema.module._forward_pre_hooks
    assert any(f for f in g.history if f.activations)  # the probes still ran on sampled steps
    g.close()
    assert not m._forward_pre_hooks and not m._forward_hooks


def _mlp_run(steps, poke_at=None, poke=None, **guard_kw):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    o = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = tg.Guard(m, o, console=False, **guard_kw)
    gen = torch.Generator().manual_seed(0)
    for t in range(steps):
        x = torch.randn(32, 16, generator=gen)
        y = (x[:, 0] > 0).long()
        if t == poke_at:
            poke(m, o)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        g.step(loss)
    return m, o, g


def _latent_inf(m, o):
    """-Inf into the bias of a ReLU unit: the unit is dead, the loss and gradients stay finite
    and the bias never moves again, so only a read of the weights sees it."""
    with torch.no_grad():
        m[0].bias[3] = -math.inf


def test_a_snapshot_never_holds_corrupted_weights():
    """Fault campaign (bench/faults.py): Inf injected at step 13 between parameter checks was
    copied into the step-16 snapshot; the rollback at step 20 restored it and the run ended
    with Inf weights. Snapshots are verified now: the corrupted one is refused, the rollback
    restores the verified step-8 snapshot."""
    m, o, g = _mlp_run(24, poke_at=13, poke=_latent_inf, snapshot_every=8)
    g.close()
    assert g.counts.get("snapshot_refused", 0) >= 1
    rb = [a for a in g.actions if a.kind == "rollback"]
    assert rb and rb[0].detail["to_step"] <= 13
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_a_run_never_ends_on_corruption_made_after_the_last_check():
    m, o, g = _mlp_run(23, poke_at=21, poke=_latent_inf, snapshot_every=8)
    assert not all(torch.isfinite(p).all() for p in m.parameters())  # not yet seen
    g.close()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert any(a.kind == "rollback" and "at close" in a.reason for a in g.actions)
    assert any(f.kind == "nonfinite" and f.origin == "parameters" for f in g.findings)


def test_finite_but_huge_weights_are_named():
    def huge(m, o):
        with torch.no_grad():
            m[0].bias[3] = -3e16
    m, o, g = _mlp_run(22, poke_at=15, poke=huge)
    f = [f for f in g.findings if f.kind == "nonfinite" and f.origin == "parameters"]
    assert f and f[0].step == 20 and "huge" in f[0].message
    g.close()
    assert all(p.abs().max() < 1e15 for p in m.parameters())


def test_an_absurd_early_loss_is_a_spike():
    """A bit flip in a logit (1.4 -> 1.9e36) at step 17 left the loss at 1.9e36 with normal
    gradients: no finding before the loss-spike detector had 20 steps of history."""
    from trainguard.detect import LossSpikeDetector
    d = LossSpikeDetector()
    from trainguard.types import StepStats
    for t in range(17):
        assert d.update(StepStats(step=t, loss=1.4 - 0.01 * t, grad_norm=1.0)) == []
    f = d.update(StepStats(step=17, loss=1.9e36, grad_norm=1.0))
    assert f and f[0].kind == "loss_spike"
    assert d.update(StepStats(step=18, loss=1.2, grad_norm=1.0)) == []


def test_a_fed_back_hidden_state_is_not_called_the_batch():
    """The PyTorch examples' RNN LM feeds the hidden state of the last batch back in; when it
    went NaN the halt blamed "the batch" (args[1]). It is named as the model's own output now,
    and the remedy says to reset it (on_reset does)."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.rnn = nn.GRU(8, 16, batch_first=True)
            self.out = nn.Linear(16, 20)
            self.poison = False

        def forward(self, x, h):
            y, h = self.rnn(self.emb(x), h)
            if self.poison:
                h = h * float("nan")  # the state handed back to the loop goes bad
            return self.out(y), h

    torch.manual_seed(0)
    m = LM()
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    resets = []
    g = tg.Guard(m, o, console=False, on_reset=resets.append)
    h = torch.zeros(1, 4, 16)
    gen = torch.Generator().manual_seed(0)
    for t in range(6):
        x = torch.randint(0, 20, (4, 6), generator=gen)
        o.zero_grad()
        m.poison = t == 3
        logits, h_new = m(x, h)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 20), x.reshape(-1))
        loss.backward()
        g.step(loss)
        h = h_new.detach()
    f = [f for f in g.findings if f.kind == "nonfinite" and f.step == 4]
    assert f, [str(x) for x in g.findings]
    assert f[0].where == "args[1]" and f[0].evidence["locate"].get("fed_back") is True
    assert "fed back" in f[0].message and "on_reset" in f[0].remedies[0]
    assert [a.step for a in resets] == [4, 5]


# -- integrity="step": latent corruption seen at its step (issue #12, item 4) ---------------------
def _adaptive_run(opt_name, steps, poke_after, poke, **guard_kw):
    """A small classifier trained with ``torch.optim.<opt_name>``; ``poke(m, o)`` runs right
    after step ``poke_after``."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    o = getattr(torch.optim, opt_name)(m.parameters(), lr=1e-2)
    g = tg.Guard(m, o, console=False, **guard_kw)
    for t in range(steps):
        x = torch.randn(16, 8)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
        loss.backward()
        g.step(loss)
        if t == poke_after:
            poke(m, o)
    return m, o, g


@pytest.mark.parametrize("poke,value", [("inf", -math.inf), ("huge", -3e16)])
def test_integrity_step_sees_a_latent_weight_at_its_step(poke, value):
    """An Inf (or huge) bias of a dead ReLU unit keeps the loss and gradients finite: on the
    default cadence it is seen up to ``param_norm_every`` steps late (step 20 for a poke before
    step 15); with integrity="step" the weights are judged every step and it is seen at once."""
    def bad(m, o):
        with torch.no_grad():
            m[0].bias[3] = value
    m, o, g = _mlp_run(22, poke_at=15, poke=bad, integrity="step")
    f = [f for f in g.findings if f.kind == "nonfinite" and f.origin == "parameters"]
    assert f and f[0].step == 15, [str(x) for x in g.findings]
    assert any(a.kind == "rollback" and a.step == 15 for a in g.actions)
    # healthy steps still report the weights' norms on the cadence only
    assert all(s.param_norms is None for s in g.core.history if s.step % 10 and s.step < 15)
    g.close()
    assert all(torch.isfinite(p).all() and p.abs().max() < 1e15 for p in m.parameters())


@pytest.mark.parametrize("opt_name,key", [("Adam", "exp_avg_sq"), ("RMSprop", "square_avg"),
                                          ("Adagrad", "sum")])
@pytest.mark.parametrize("at", [13, 14])
def test_integrity_step_sees_a_frozen_coordinate_within_one_step(opt_name, key, at):
    """+Inf in the state that divides the update freezes a weight with nothing downstream to
    show it; integrity="step" reads that state in two rolling halves, so it is found at the
    step after the corruption or the one after (within one step of its first use), on either
    parity, and rolled back."""
    def freeze(m, o):
        o.state[m[2].weight][key][0, 0] = float("inf")
    m, o, g = _adaptive_run(opt_name, 24, at, freeze, integrity="step")
    f = next(x for x in g.findings if x.kind == "nonfinite")
    assert f.origin == "optimizer" and f.where == "2" and at + 1 <= f.step <= at + 2, str(f)
    assert any(a.kind == "rollback" and a.step == f.step for a in g.actions)
    assert all(torch.isfinite(v).all() for st in o.state.values() for v in st.values()
               if torch.is_tensor(v))


def test_integrity_step_follows_a_replaced_optimizer_state():
    """The rolling read caches the state tensors; a load_state_dict replaces them, and the
    corruption of the new tensors is still seen."""
    def replace_then_freeze(m, o):
        o.load_state_dict(o.state_dict())  # new state tensors
        o.state[m[2].weight]["exp_avg_sq"][1, 1] = float("inf")
    m, o, g = _adaptive_run("Adam", 16, 10, replace_then_freeze, integrity="step")
    f = next(x for x in g.findings if x.kind == "nonfinite")
    assert f.origin == "optimizer" and 11 <= f.step <= 12, str(f)


def test_integrity_step_follows_a_state_tensor_swapped_in_place():
    """A state tensor replaced inside the same state dict (same size, so the rolling split's
    key does not change) is picked up at the next full read: corrupting the new tensor after
    that is seen within one step, not at the following full read (step 20)."""
    def swap(m, o):
        st = o.state[m[2].weight]
        st["exp_avg_sq"] = st["exp_avg_sq"].clone()
    m, o, g = _adaptive_run("Adam", 4, 3, swap, integrity="step")
    for t in range(4, 20):  # the same run goes on; the new tensor goes bad after step 13
        x = torch.randn(16, 8)
        o.zero_grad()
        loss = nn.functional.cross_entropy(m(x), (x[:, 0] > 0).long())
        loss.backward()
        g.step(loss)
        if t == 13:
            o.state[m[2].weight]["exp_avg_sq"][0, 1] = float("inf")
    f = next(x for x in g.findings if x.kind == "nonfinite")
    assert f.origin == "optimizer" and 14 <= f.step <= 15, str(f)


def test_integrity_must_be_a_known_mode():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="integrity must be 'cadence' or 'step'"):
        tg.Guard(m, torch.optim.SGD(m.parameters(), lr=0.1), console=False, integrity="always")
