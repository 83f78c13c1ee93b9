"""Nothing lost (issue #12): guard.step's return value is the truth, and a norm that overflows
fp32 is not the loss scaler's own skip. Each test fails on the code before the fix."""
from __future__ import annotations

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
