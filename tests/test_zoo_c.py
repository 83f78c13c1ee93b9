"""Zoo part C: Transformer scenarios from issue 3. The premise of each (the bare run fails its
criterion on seed 0) and what the Guard finds; real, seeded, CPU training runs."""
from __future__ import annotations

import pytest
import torch

import trainguard as tg
from trainguard.zoo import REGISTRY, train
import trainguard.zoo.scenarios  # noqa: F401  (registers the scenarios)

PART_C = ["transformer_postln_warmup"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_part_c_scenarios_are_registered():
    # completeness of every scenario is checked once, in tests/test_zoo.py
    assert all(REGISTRY[n].category == "pathological" for n in PART_C)


@pytest.mark.slow
def test_postln_warmup_fails_bare():
    s = REGISTRY["transformer_postln_warmup"]
    r = train(s.build(0), "bare")
    assert r.finished
    assert not s.passed(r), f"the bare run should fail its criterion ({s.criterion})"


@pytest.mark.slow
def test_postln_warmup_guard_names_it():
    s = REGISTRY["transformer_postln_warmup"]
    g = train(s.build(0), "guarded",
              guard_factory=lambda st: tg.Guard(st.model, st.optimizer, scaler=st.scaler,
                                                console=False, **st.guard_kwargs))
    assert {f.kind for f in g.findings} & set(s.expected)
