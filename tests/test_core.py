"""The decision core imports no torch (issue #10, item 1), and drives detectors -> policy ->
records on synthetic StepStats streams."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from trainguard.core import DecisionCore
from trainguard.policy import Policy
from trainguard.types import StepStats

BLOCK_TORCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_core_imports_and_decides_without_torch():
    r = _run("""
        import trainguard
        from trainguard import DecisionCore, Policy, StepStats
        import trainguard.core, trainguard.detect, trainguard.report
        core = DecisionCore(sinks=[trainguard.report.ConsoleSink()])
        for t in range(30):
            s = StepStats(step=t, loss=2.0 - 0.01 * t, grad_norm=1.0 + 0.01 * (t % 3),
                          modules=["fc"], grad_norms=[1.0])
            plan = core.decide(core.detect(s))
            core.step_count += 1
        bad = StepStats(step=30, loss=float("nan"), grad_norm=float("nan"), modules=["fc"],
                        grad_norms=[float("nan")])
        f = core.detect(bad)
        for x in f:
            core.emit(x)
        plan = core.decide(f)
        print(plan.kinds(), "torch" in sys.modules)
        try:
            trainguard.Guard
        except ImportError as e:
            print("Guard needs torch")
    """)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    assert out[-2] == "{'skip'} False"
    assert out[-1] == "Guard needs torch"


def test_core_records_are_bounded_and_state_round_trips():
    core = DecisionCore(policy=Policy(), keep_records=10)
    for t in range(50):
        core.act("clip", f"clip {t}", step=t)
    assert len(core.actions) <= 12 and core.action_counts["clip"] == 50
    state = core.state_dict()
    other = DecisionCore()
    other.load_state_dict(state)
    assert other.action_counts == core.action_counts and other.first["action:clip"].step == 0


def test_core_rejects_bad_options():
    with pytest.raises(TypeError, match="Policy"):
        DecisionCore(policy="skip")
    with pytest.raises(ValueError, match="chance_loss"):
        DecisionCore(chance_loss=-1.0)


def test_unknown_loss_is_not_a_finding():
    core = DecisionCore()
    for t in range(200):
        s = StepStats(step=t, loss=float("nan"), grad_norm=1.0, modules=["fc"], grad_norms=[1.0],
                      loss_known=False)
        assert core.detect(s) == []
        core.step_count += 1


def test_deferred_mode_is_built_on_the_pieces_not_on_the_guard():
    """sync=False uses the core, the step probe and the executor: it imports no Guard and
    reaches into no Guard (issue #10: it drove 15 private members and overwrote step_count)."""
    import ast
    import inspect

    import trainguard.deferred as deferred
    tree = ast.parse(inspect.getsource(deferred))
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "guard" not in modules and not any((m or "").endswith(".guard") for m in modules)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "guard" not in names and "Guard" not in names
