"""trainguard.locate: replaying a failing step names the origin and the module of the first
NaN/Inf. Real small seeded models; faults are real numerical bugs (log(0), sqrt at 0, fp16
overflow, Adam with eps=0 on a dead unit) or planted with hooks where no natural bug exists."""
import json
import math
import os
import socket

import pytest
import torch
from torch import nn

import trainguard as tg
from trainguard.locate import Bundle, BundleError, Location, StepCapture, locate, replay_bundle
from trainguard.types import ORIGINS, Finding

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- models
class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.temperature = 1.0

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / self.temperature, dim=-1)
        return self.proj(att @ v)


class RMSNorm(nn.Module):
    """sqrt of a sum of squares: its backward is inf*0 = NaN on an all-zero row."""

    def forward(self, x):
        return x / (torch.sqrt((x * x).sum(-1, keepdim=True)) + 1e-6)


class Layer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = Attention(d)
        self.norm = RMSNorm()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(inplace=True), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(self.norm(x))


class Encoder(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Layer(d) for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Net(nn.Module):
    def __init__(self, d: int = 16, n: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.bn = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(0.2)
        self.encoder = Encoder(d, n)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: (N, T, 8)
        h = self.embed(x)
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        h = self.encoder(self.drop(h))
        return self.head(h.mean(1))


def make_model() -> nn.Module:
    """The factory `trainguard replay` uses (module:callable = test_locate:make_model)."""
    torch.manual_seed(0)
    return Net()


def make_data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 6, 8, generator=g), torch.randint(0, 5, (12,), generator=g)


def nonfinite(step: int = 0) -> Finding:
    return Finding(kind="nonfinite", step=step, message="the loss is nan", severity="critical")


def run_step(model, capture, x, y, loss_fn=nn.functional.cross_entropy, stats=None):
    """One training step as the Guard drives it: forward, backward, refine, release."""
    loss = loss_fn(model(x), y)
    loss.backward()
    bad = not torch.isfinite(loss) or any(
        p.grad is not None and not torch.isfinite(p.grad).all() for p in model.parameters())
    f = capture.refine(nonfinite(), model, stats) if bad else None
    capture.release()
    return loss, f


# ---------------------------------------------------------------------------- origins
def test_input_origin():
    m = make_model()
    cap = StepCapture(m)
    x, y = make_data()
    x[3, 2, 5] = math.nan
    _, f = run_step(m, cap, x, y)
    assert f.origin == "input" and f.where == "args[0]"
    assert "1 NaN" in f.message
    loc = locate(m, nn.functional.cross_entropy, (x, y))
    assert (loc.origin, loc.where) == ("input", "batch[0]")
    y2 = torch.full((12,), -1.0)
    y2[0] = math.nan  # a NaN target is also the batch's fault
    loc = locate(m, lambda o, t: ((o[:, 0] - t) ** 2).mean(), (make_data()[0], y2))
    assert loc.origin == "input" and loc.where == "batch[1]" and "target" in loc.message


def test_forward_origin_names_nested_module_and_last_healthy_values():
    m = make_model()
    m.encoder.layers[1].attn.temperature = 0.0  # q.k / 0: +-inf logits, NaN softmax
    cap = StepCapture(m)
    _, f = run_step(m, cap, *make_data())
    assert f.kind == "nonfinite" and f.origin == "forward"
    # the NaN is made by attn's own code (softmax of q.k/0), not by its qkv or proj children
    assert f.where == "encoder.layers.1.attn"
    assert "last healthy outputs before it" in f.message
    assert "encoder.layers.1.attn.qkv (float32, |x|max" in f.message
    frames = f.evidence["locate"]["frames"]
    assert frames and all(math.isfinite(fr[1]["headroom"]) for fr in frames)
    assert f.remedies and "fp32" in f.remedies[0]


def test_forward_origin_planted_in_leaf_module():
    m = make_model()
    cap = StepCapture(m)
    h = m.encoder.layers[2].mlp[2].register_forward_hook(lambda mod, i, o: o * math.inf)
    _, f = run_step(m, cap, *make_data())
    h.remove()
    assert (f.origin, f.where) == ("forward", "encoder.layers.2.mlp.2")


def test_fp16_autocast_overflow_is_named_with_dtype_and_headroom():
    m = make_model()
    with torch.no_grad():  # fp16's largest finite value is 65504
        m.encoder.layers[0].mlp[2].weight[0] = 1000.0
        m.encoder.layers[0].mlp[2].bias[0] = 65000.0
    cap = StepCapture(m)
    x, y = make_data()
    with torch.autocast("cpu", dtype=torch.float16):
        out = m(x)
    nn.functional.cross_entropy(out.float(), y).backward()
    f = cap.refine(nonfinite(), m, None)
    cap.release()
    assert (f.origin, f.where) == ("forward", "encoder.layers.0.mlp.2")
    assert f.evidence["locate"]["culprit"]["dtype"] == "float16"
    assert "float16" in f.message and "headroom" in f.message


def test_loss_origin_log_of_zero():
    m = make_model()
    cap = StepCapture(m)
    x, y = make_data()

    def naive_nll(out, y):  # log(softmax) underflows to log(0) = -inf for extreme logits
        p = torch.softmax(out * 1e4, dim=-1)
        return -torch.log(p[torch.arange(len(y)), y]).mean()
    _, f = run_step(m, cap, x, y, loss_fn=naive_nll)
    assert f.origin == "loss" and f.where == "(loss)"
    assert "log_softmax" in f.remedies[0]
    loc = locate(m, naive_nll, (x, y))
    assert loc.origin == "loss"


def test_backward_origin_sqrt_at_zero():
    m = make_model()
    cap = StepCapture(m)
    x, y = make_data()

    # an all-zero row reaching the RMSNorm of layer 2: forward finite (0 / eps), backward NaN
    def zero_row(mod, args):
        mask = torch.ones_like(args[0])
        mask[0, 0] = 0.0
        return (args[0] * mask,)
    h = m.encoder.layers[2].norm.register_forward_pre_hook(zero_row)
    loss, f = run_step(m, cap, x, y)
    assert torch.isfinite(loss)
    assert (f.origin, f.where) == ("backward", "encoder.layers.2.norm")
    assert "last healthy gradients" in f.message
    loc = locate(m, nn.functional.cross_entropy, (x, y))
    h.remove()
    assert (loc.origin, loc.where) == ("backward", "encoder.layers.2.norm")


def test_backward_origin_parameter_gradient():
    m = make_model()
    cap = StepCapture(m)
    h = m.encoder.layers[0].attn.proj.weight.register_hook(lambda g: g * math.inf)
    _, f = run_step(m, cap, *make_data())
    h.remove()
    assert (f.origin, f.where) == ("backward", "encoder.layers.0.attn.proj")


def _dead_unit_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].bias[2] = -100.0  # unit 2 never fires: its weights get exactly zero gradients
    return m


def test_optimizer_origin_confirmed_by_an_update_hook():
    m = _dead_unit_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, eps=0.0)
    cap = StepCapture(m, optimizer=opt)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    _, f = run_step(m, cap, x, y)
    assert f is None
    opt.step()
    opt.zero_grad()
    _, f = run_step(m, cap, x, y)
    assert (f.origin, f.where) == ("optimizer", "0")
    # without an update since the last healthy step, non-finite weights were "already there"
    cap2 = StepCapture(m, optimizer=opt)
    _, f = run_step(m, cap2, x, y)
    assert f.origin == "parameters"


def test_external_write_after_a_finite_update_is_parameters():
    m = _dead_unit_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    cap = StepCapture(m, optimizer=opt)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    run_step(m, cap, x, y)
    opt.step()
    with torch.no_grad():
        m[2].weight[0, 0] = math.inf  # e.g. a bad checkpoint load mid-run
    _, f = run_step(m, cap, x, y)
    assert (f.origin, f.where) == ("parameters", "2")
    # without the optimizer, non-finite weights are never blamed on it
    m2 = _dead_unit_mlp()
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2, eps=0.0)
    cap2 = StepCapture(m2)
    run_step(m2, cap2, x, y)
    opt2.step()
    _, f = run_step(m2, cap2, x, y)
    assert f.origin == "parameters"


def test_parameters_origin_through_the_guard():
    m = make_model()
    with torch.no_grad():
        m.encoder.layers[1].mlp[2].weight[0, 0] = math.nan  # e.g. a corrupted checkpoint
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = tg.Guard(m, opt, console=False)
    x, y = make_data()
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    # weights corrupted before the first step: no verified snapshot to return to, so the
    # Guard halts at once with the story (a rollback used to "restore" the NaN weights)
    with pytest.raises(tg.TrainingUnstable, match="reload a clean checkpoint"):
        guard.step(loss)
    f = guard.findings[0]
    assert (f.origin, f.where) == ("parameters", "encoder.layers.1.mlp.2")
    loc = locate(m, nn.functional.cross_entropy, (x, y))
    assert (loc.origin, loc.where) == ("parameters", "encoder.layers.1.mlp.2")


def test_guard_integration_forward_fault():
    m = make_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    guard = tg.Guard(m, opt, console=False)
    x, y = make_data()
    for step in range(4):
        h = (m.encoder.layers[2].attn.qkv.register_forward_hook(lambda mod, i, o: o * math.nan)
             if step == 2 else None)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        guard.step(loss)
        if h is not None:
            h.remove()
    f = next(f for f in guard.findings if f.kind == "nonfinite")
    assert f.step == 2 and (f.origin, f.where) == ("forward", "encoder.layers.2.attn.qkv")
    assert f.origin in ORIGINS
    guard.close()
    assert not m._forward_hooks and not m._forward_pre_hooks


# ---------------------------------------------------------------------------- no side effects
def _state(m, opt=None):
    st = {k: v.detach().clone() for k, v in m.state_dict().items()}
    st.update({f"grad.{n}": p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    if opt is not None:
        for i, s in enumerate(opt.state.values()):
            st.update({f"opt.{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return st


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) or
                                        (torch.isnan(a[k]).any() and torch.allclose(a[k], b[k], equal_nan=True))
                                        for k in a)


def test_refine_and_locate_modify_nothing():
    m = make_model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    cap = StepCapture(m, optimizer=opt)
    x, y = make_data()
    run_step(m, cap, x, y)
    opt.step()
    opt.zero_grad()
    hk = m.encoder.layers[0].mlp[0].register_forward_hook(lambda mod, i, o: o * math.inf)
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    before = _state(m, opt)
    hooks = [(len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks))
             for mod in m.modules()]
    rng = torch.get_rng_state()
    f = cap.refine(nonfinite(), m, None)
    assert f.origin == "forward"
    assert _same(before, _state(m, opt))  # params, grads, BN running stats, Adam moments
    assert torch.equal(rng, torch.get_rng_state())
    assert m.encoder.layers[0].mlp[1].inplace is True
    assert torch.is_grad_enabled()
    loc = locate(m, nn.functional.cross_entropy, (x, y))
    assert loc.origin == "forward"
    assert _same(before, _state(m, opt)) and torch.equal(rng, torch.get_rng_state())
    assert hooks == [(len(mod._forward_hooks), len(mod._forward_pre_hooks), len(mod._backward_hooks))
                     for mod in m.modules()]
    assert not any(p._backward_hooks for p in m.parameters() if p._backward_hooks)
    hk.remove()
    cap.release()
    cap.remove()
    assert not m._forward_hooks and not m._forward_pre_hooks


def test_replay_reuses_the_dropout_mask():
    m = make_model()
    cap = StepCapture(m)
    assert cap.random
    seen = []
    h = m.drop.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    m.encoder.layers[0].attn.temperature = 0.0
    run_step(m, cap, *make_data())
    h.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_capture_ignores_no_grad_forwards_and_keeps_the_first():
    m = make_model()
    cap = StepCapture(m)
    x, y = make_data()
    with torch.no_grad():
        m(x * 0)  # an evaluation pass does not count
    assert not cap.taken
    m(x)
    first = cap.args[0]
    m(x + 1)  # a second micro-batch: the first forward of the step is kept
    assert cap.args[0] is first
    cap.release()
    assert cap.args is None and not cap.taken


class Plain(nn.Module):
    """No training-time randomness: the capture takes the inputs in its one forward hook."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.norm = RMSNorm()
        self.head = nn.Linear(16, 5)

    def forward(self, x, scale=1.0):
        return self.head(self.norm(self.embed(x) * scale)).mean(1)


def test_one_hook_capture_locates_and_keeps_the_first_forward():
    torch.manual_seed(0)
    m = Plain()
    cap = StepCapture(m)
    assert not cap.random and not cap.pre_hook
    assert len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 1
    x, y = make_data()
    with torch.no_grad():
        m(x * 0)  # an evaluation pass does not count
    assert not cap.taken
    out = m(x, scale=2.0)
    assert cap.args[0] is x and cap.kwargs == {"scale": 2.0} and cap.training
    m(x + 1)  # a second micro-batch: the first forward of the step is kept
    assert cap.args[0] is x
    out.sum().backward()
    assert cap.grads[0] is not None and cap.grads[0].shape == out.shape
    cap.release()
    # a backward-origin fault: an all-zero row reaching the RMSNorm (0 / eps forward, NaN back)
    h = m.norm.register_forward_pre_hook(lambda mod, a: (a[0] * (a[0][:, :1, :1] != 0),))
    x0 = x.clone()
    x0[:, 0] = 0.0
    m.embed.bias.data.zero_()
    loss, f = run_step(m, cap, x0, y)
    h.remove()
    assert torch.isfinite(loss)
    assert (f.origin, f.where) == ("backward", "norm")
    x[2, 1, 3] = math.nan
    _, f = run_step(m, cap, x, y)
    assert (f.origin, f.where) == ("input", "args[0]")
    cap.remove()
    assert len(m._forward_hooks) == 0


def test_capture_takes_the_inputs_from_before_another_pre_hook():
    """A pre-hook registered earlier may replace the inputs; a replay calls the model, which
    runs that hook again, so the capture keeps the inputs as they were before it."""
    torch.manual_seed(0)
    m = Plain()
    m.register_forward_pre_hook(lambda mod, a: (a[0] * 2,))
    cap = StepCapture(m)
    assert cap.pre_hook
    x, _ = make_data()
    m(x)
    assert cap.args[0] is x
    cap.release()
    # a pre-hook that appears later is seen at its first forward; from then on the capture
    # takes the inputs before it
    m2 = Plain()
    cap2 = StepCapture(m2)
    assert not cap2.pre_hook
    m2.register_forward_pre_hook(lambda mod, a: (a[0] * 2,))
    m2(x)
    assert cap2.pre_hook
    cap2.release()
    m2(x)
    assert cap2.args[0] is x


def test_the_guards_own_sampled_step_hooks_keep_the_one_hook_capture():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = tg.Guard(m, opt, console=False, sample_every=2)
    x, y = make_data()
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        g.step(loss)
    assert g._capture is not None and not g._capture.pre_hook
    assert any(r.activations for r in g.core.history)  # sampled steps armed hooks
    g.close()


def test_healthy_step_is_not_reproduced_and_refine_never_raises():
    m = make_model()
    cap = StepCapture(m)
    loss = nn.functional.cross_entropy(m(make_data()[0]), make_data()[1])
    loss.backward()
    f = cap.refine(nonfinite(5), m, None)
    assert f.step == 5 and f.evidence["locate"]["reproduced"] is False
    cap.args = ("not a tensor",)  # a broken capture: the original finding comes back
    f = cap.refine(nonfinite(6), m, None)
    assert "locate_error" in f.evidence and f.message == "the loss is nan"


# ---------------------------------------------------------------------------- bundles
def test_bundle_round_trip_and_replay_cli(tmp_path, capsys):
    m = make_model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    cap = StepCapture(m, optimizer=opt, bundle_dir=tmp_path, model_factory="test_locate:make_model")
    m.encoder.layers[1].attn.temperature = 0.0
    _, f = run_step(m, cap, *make_data())
    assert (f.origin, f.where) == ("forward", "encoder.layers.1.attn")
    path = f.evidence["bundle"]
    assert os.path.isdir(path) and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    man = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert man["origin"] == "forward" and man["where"] == "encoder.layers.1.attn"
    assert man["model_factory"] == "test_locate:make_model" and man["param_dtypes"] == {"float32": len(list(m.parameters()))}
    b = Bundle(path)
    assert torch.equal(b.inputs()[0][0], make_data()[0])
    assert set(b.model_state()) == set(m.state_dict())

    # the factory's model has temperature 1.0: the replay must reproduce from the bundle
    # alone, so this case replays a planted weight instead
    m2 = make_model()
    cap2 = StepCapture(m2, bundle_dir=tmp_path / "b2", model_factory="test_locate:make_model")
    with torch.no_grad():
        m2.encoder.layers[2].mlp[2].weight[0] = 3e38  # overflows to inf in the forward
        m2.encoder.layers[2].mlp[2].bias[0] = 3e38
    _, f2 = run_step(m2, cap2, *make_data())
    assert (f2.origin, f2.where) == ("forward", "encoder.layers.2.mlp.2")
    path2 = f2.evidence["bundle"]
    from trainguard.cli import main
    assert main(["replay", path2]) == 2  # the manifest's factory is code: not without consent
    assert "--trust-bundle" in capsys.readouterr().err
    assert main(["replay", path2, "--trust-bundle"]) == 0
    out = capsys.readouterr().out
    assert "origin=forward where=encoder.layers.2.mlp.2" in out
    assert "matches the recorded location" in out
    assert main(["replay", path2, "--factory", "test_locate:make_model"]) == 0
    loc = replay_bundle(path2, make_model())
    assert (loc.origin, loc.where) == ("forward", "encoder.layers.2.mlp.2")


def test_bundle_replays_a_backward_fault_from_the_saved_output_gradient(tmp_path, capsys):
    m = make_model()
    cap = StepCapture(m, bundle_dir=tmp_path, model_factory="test_locate:make_model")

    def loss_fn(out, y):  # sqrt at 0 in the loss: finite loss, infinite gradient
        return torch.sqrt((out - out.detach()) ** 2 + 0.0).sum() + nn.functional.cross_entropy(out, y)
    _, f = run_step(m, cap, *make_data(), loss_fn=loss_fn)
    assert f.origin == "loss"
    from trainguard.cli import main
    assert main(["replay", f.evidence["bundle"], "--trust-bundle"]) == 0
    assert "origin=loss where=(loss)" in capsys.readouterr().out


def test_replay_bad_inputs_give_clear_errors(tmp_path, capsys):
    from trainguard.cli import main
    assert main(["replay", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["replay", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "trainguard-repro", "version": 99}))
    assert main(["replay", str(tmp_path)]) == 2
    assert "version 99" in capsys.readouterr().err
    m = make_model()
    cap = StepCapture(m, bundle_dir=tmp_path / "b")
    m.encoder.layers[0].attn.temperature = 0.0
    _, f = run_step(m, cap, *make_data())
    assert main(["replay", f.evidence["bundle"]]) == 2
    assert "--factory" in capsys.readouterr().err
    assert main(["replay", f.evidence["bundle"], "--factory", "test_locate:_dead_unit_mlp"]) == 2
    assert "does not match" in capsys.readouterr().err
    with pytest.raises(BundleError):
        Bundle(str(tmp_path / "nope"))


def test_locate_and_capture_reject_bad_arguments():
    m = make_model()
    with pytest.raises(TypeError, match="nn.Module"):
        locate("model", nn.functional.cross_entropy, make_data())
    with pytest.raises(TypeError, match="callable"):
        locate(m, 3, make_data())
    with pytest.raises(TypeError, match="batch must be"):
        locate(m, nn.functional.cross_entropy, 42)
    with pytest.raises(ValueError, match="no tensor"):
        locate(m, nn.functional.cross_entropy, {"a": 1})
    with pytest.raises(TypeError, match="nn.Module"):
        StepCapture(object())
    with pytest.raises(ValueError, match="module:callable"):
        StepCapture(m, model_factory="nocolon")
    loc = locate(m, nn.functional.cross_entropy, make_data())
    assert isinstance(loc, Location) and not loc.found and loc.finding.kind == "nonfinite"
    assert tg.locate(m, nn.functional.cross_entropy, make_data()).found is False


# ---------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        cap = StepCapture(model)
        x, y = make_data(seed=rank + 1)
        if rank == 1:
            x[0, 0, 0] = math.inf  # a bad sample on rank 1 only
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # the all-reduce spreads rank 1's NaN gradients to rank 0
        grads_bad = any(not torch.isfinite(p.grad).all() for p in model.parameters())
        f = cap.refine(nonfinite(), model, None)
        cap.release()
        # the replay ran on the inner module: DDP's reducer is still usable
        loss = nn.functional.cross_entropy(model(make_data()[0]), make_data()[1])
        loss.backward()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"origin": f.origin, "where": f.where, "message": f.message,
                       "grads_bad": grads_bad, "rank": f.evidence["locate"]["rank"],
                       "culprit_rank": f.evidence["locate"].get("culprit_rank")}, fh)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_ddp_names_the_rank_whose_batch_went_bad(tmp_path):
    import torch.multiprocessing as mp
    try:
        mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessExitedException:
        # gloo's teardown occasionally aborts a process after its work is done
        # ("terminate called without an active exception"); the results must be there
        if not all((tmp_path / f"rank{r}.json").exists() for r in range(2)):
            raise
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["grads_bad"] and r1["grads_bad"]
    # every rank reports the same location: rank 1's bad batch
    for r in (r0, r1):
        assert (r["origin"], r["where"], r["culprit_rank"]) == ("input", "args[0]", 1)
        assert r["message"].startswith("rank 1:") and "rank(s) 0 is finite" in r["message"]
    assert (r0["rank"], r1["rank"]) == (0, 1)


class _Two(nn.Module):
    """Two outputs of one autograd node (chunk), and a leaf returned as an output."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):  # type: ignore[no-untyped-def]
        a, b = self.lin(x).chunk(2, dim=-1)
        return a, b, self.bias


@pytest.mark.parametrize("use", ["a", "ab", "a+bias"])
def test_captured_output_gradients_are_the_losss_gradients(use):
    """The capture keeps, for each output, the gradient the backward pass gave it (a pre-hook
    on the output's node; a tensor hook for a leaf output): equal to autograd's own, None for
    an output the loss did not use."""
    torch.manual_seed(0)
    m = _Two()
    cap = StepCapture(m)
    x = torch.randn(5, 4)
    a, b, bias = m(x)
    loss = (a ** 2).sum()
    if "b" in use:
        loss = loss + (b * 3).sum()
    if "bias" in use:
        loss = loss + (a * bias).sum()
    want = torch.autograd.grad(loss, [a, b, bias], retain_graph=True, allow_unused=True)
    loss.backward()
    for got, ref in zip(cap.grads, want):
        if ref is None:
            assert got is None
        else:
            assert got is not None and torch.equal(got, ref)
    cap.release()
    cap.remove()


def test_a_parameter_returned_as_an_output_gathers_no_hooks():
    """A model that returns one of its parameters (a learned temperature, say): the capture's
    gradient hook on that leaf is removed at the end of each step (it stayed, one more per
    step, for the whole run)."""
    torch.manual_seed(0)
    m = _Two()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = tg.Guard(m, opt, console=False)
    for _ in range(12):
        opt.zero_grad()
        a, b, bias = m(torch.randn(5, 4))
        ((a * bias).sum() + b.pow(2).sum()).backward()
        g.step(torch.tensor(1.0))
    assert not m.bias._backward_hooks
    g.close()


# ---------------------------------------------------------------------------- several passes
def _two_view_run(bad_view):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, o, console=False)
    for i in range(25):
        x = torch.randn(32, 16)
        views = [x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)]
        if i == 20 and bad_view is not None:
            views[bad_view][3, 2] = math.nan
        z1, z2 = (nn.functional.normalize(m(v), dim=1) for v in views)
        loss = nn.functional.cross_entropy(z1 @ z2.T / 0.1, torch.arange(32))  # InfoNCE
        o.zero_grad()
        loss.backward()
        g.step(loss)
    g.close()
    return g


def test_a_nan_in_the_second_pass_of_a_step_is_named_as_the_input():
    # a contrastive pair runs the model twice per step; only the first pass was replayed, so a
    # NaN in the second view was blamed on "the loss function" (its gradient reached pass 1)
    g = _two_view_run(1)
    f = next(f for f in g.findings if f.kind == "nonfinite")
    assert (f.step, f.origin, f.where) == (20, "input", "args[0]")
    assert f.evidence["locate"]["forward"] == 2 and "forward pass 2 of 2" in f.message
    g = _two_view_run(0)  # the first pass, as before
    f = next(f for f in g.findings if f.kind == "nonfinite")
    assert (f.origin, f.where) == ("input", "args[0]") and "forward" not in f.evidence["locate"]


def test_a_nan_in_a_later_micro_batch_of_an_accumulated_step_is_named():
    # gradient accumulation runs one forward per micro-batch: the third one held the NaN and
    # used to be reported as not reproduced (only the first micro-batch was replayed)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = tg.Guard(m, o, console=False)
    for i in range(25):
        o.zero_grad()
        for k in range(4):
            x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
            if i == 20 and k == 2:
                x[1, 1] = math.nan
            loss = nn.functional.cross_entropy(m(x), y)
            (loss / 4).backward()
            g.observe_loss(loss)
        g.step()
    g.close()
    f = next(f for f in g.findings if f.kind == "nonfinite")
    assert (f.step, f.origin, f.where) == (20, "input", "args[0]")
    assert "forward pass 3 of 4" in f.message
