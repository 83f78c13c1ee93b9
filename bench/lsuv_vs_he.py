"""LSUV or He init first on a ReLU net deep for its width (doctor.prescribe.DEEP_NARROW)?

    python bench/lsuv_vs_he.py [--seeds 5] [--doctor-seeds 4]

On the zoo's ``signal_relu_xavier_deep`` (30 x 128 ReLU MLP, Xavier init, sum of 1/width 0.23):
* in the run: the scenario guarded with ``Policy(structural="repair")`` (the zoo's structural
  factory), once with the menu as shipped (LSUV first on a net this deep) and once with He
  init first (DEEP_NARROW lifted out of reach), for each seed;
* the doctor: ``tg.repair`` with one trial of each remedy (``plan=[...]``), as
  ``bench/doctor_repair.py --zoo`` builds the case.
Prints the held-out cross-entropy of each (criterion: < 1.0).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)

NAME = "signal_relu_xavier_deep"


def in_the_run(seeds: int) -> None:
    import trainguard.doctor.prescribe as prescribe
    import trainguard.zoo.scenarios  # noqa: F401 - registers the scenarios
    from trainguard.zoo.base import REGISTRY
    from trainguard.zoo.runner import _structural_factory, train
    sc = REGISTRY[NAME]
    shipped = prescribe.DEEP_NARROW
    for label, bar in (("LSUV first (shipped)", shipped), ("He init first", float("inf"))):
        prescribe.DEEP_NARROW = bar
        try:
            out = []
            for seed in range(seeds):
                r = train(sc.build(seed), "guarded", guard_factory=_structural_factory)
                first = next((a.detail.get("remedy") for a in r.actions if a.kind == "restructure"), None)
                out.append(f"{r.metric:.2f} ({first})")
        finally:
            prescribe.DEEP_NARROW = shipped
        print(f"in the run, {label}: " + " / ".join(out), flush=True)


def doctor(seeds: int) -> None:
    import doctor_repair as dr

    from trainguard.doctor import repair
    case0 = next(c for c in dr.zoo_cases(500)[0] if c.name == NAME)
    for plan in (["init:he"], ["init:lsuv"]):
        out = []
        for seed in range(seeds):
            c = case0.per_seed(seed)
            r = repair(c.model_fn, c.optimizer_fn, c.loss_fn, c.data, steps=c.steps,
                       metric=c.metric, higher_is_better=c.higher_is_better, seed=seed,
                       plan=plan, max_trials=1, progress=False)
            out.append(f"{r.metric:.2f}")
        print(f"doctor, one trial of {plan[0]}: " + " / ".join(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the in-run comparison")
    ap.add_argument("--doctor-seeds", type=int, default=4)
    a = ap.parse_args()
    in_the_run(a.seeds)
    doctor(a.doctor_seeds)


if __name__ == "__main__":
    main()
