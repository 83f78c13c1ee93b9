"""Host time of each every-step detector on a healthy stream, and (``--compare``) whether
another source tree's detectors take the same decisions.

    python bench/detector_cost.py                      # µs per step, per detector
    python bench/detector_cost.py --compare OLD/src    # both trees, interleaved; same findings?

The timing stream is 3,000 synthetic healthy steps (a slowly falling, noisy cross-entropy
with its chance level set, four modules' gradient norms); each detector runs the stream
alone, warm, ``--rounds`` times, and the median per step is printed. In a training loop the
same code costs several times this right after a backward pass (docs/guard.md, "The healthy
step's short path"), so these figures rank the detectors and compare versions; they are not
the Guard's overhead.

``--compare`` also feeds 120 synthetic streams (60 patterns x with/without a chance level:
drifts, spikes, ruins above chance and above start, give-backs, NaN losses, infinite
gradient norms, zero and vanishing first-module gradients, an LR rise, a reset at step 500)
through the default detectors of both trees and reports whether every finding (kind, step,
message, evidence, where, severity) and every detector's final ``state_dict`` are equal.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from typing import Any

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def load(src: str) -> tuple[Any, Any]:
    """``trainguard.detect`` and ``trainguard.types`` imported from the tree at ``src``."""
    for k in [k for k in sys.modules if k == "trainguard" or k.startswith("trainguard.")]:
        del sys.modules[k]
    sys.path.insert(0, src)
    try:
        import trainguard.detect as detect
        import trainguard.types as types
    finally:
        sys.path.pop(0)
    return detect, types


def healthy_stream(types: Any, n: int = 3000) -> list:
    rng = random.Random(1)
    loss, out = 2.3, []
    for t in range(n):
        loss *= math.exp(rng.gauss(-0.0005, 0.05))
        out.append(types.StepStats(step=t, loss=loss, grad_norm=1 + rng.random(),
                                   modules=["a", "b", "c", "d"],
                                   grad_norms=[rng.random() + 0.1 for _ in range(4)], lr=0.01))
    return out


def pattern_streams(types: Any, n_streams: int = 60, steps: int = 600) -> list[list]:
    rng = random.Random(0)
    out = []
    for k in range(n_streams):
        loss, g, lr, recs, mode = 2.3, 1.0, 0.01, [], k % 6
        for t in range(steps):
            if mode == 0:
                loss *= math.exp(rng.gauss(-0.003, 0.1))
            elif mode == 1:
                loss = loss * (1.5 if 300 < t < 320 else math.exp(rng.gauss(-0.002, 0.2)))
            elif mode == 2:
                loss = loss * math.exp(rng.gauss(0.0, 0.3)) if t % 97 else loss * 30
            elif mode == 3:
                loss = 2.3 + (0.1 * t if t > 200 else -0.001 * t) + rng.random()
            elif mode == 4:
                loss = 2.3 * math.exp(-t / 100) + (5 if 350 < t < 420 else 0) + 0.05 * rng.random()
            else:
                loss = abs(rng.gauss(1, 1)) * (1e5 if rng.random() < 0.01 else 1)
            g = abs(g * math.exp(rng.gauss(0, 0.3))) * (50 if rng.random() < 0.01 else 1) + 1e-6
            if t == 250 and mode == 3:
                lr *= 4
            gns = [g * abs(rng.gauss(1, 0.5)) for _ in range(4)]
            if mode == 4 and 100 < t < 200:
                gns[0] = 0.0
            if mode == 5 and 100 < t < 200:
                gns[0] = g * 1e-6
            value = math.nan if mode == 2 and t in (400, 401) else loss
            recs.append(types.StepStats(step=t, loss=value, grad_norm=g if t != 450 else math.inf,
                                        modules=["a", "b", "c", "d"], grad_norms=gns, lr=lr,
                                        param_norm=10.0))
        out.append(recs)
    return out


def decisions(detect: Any, streams: list[list], chance: bool) -> list:
    res = []
    for recs in streams:
        dets = detect.default_detectors()
        if chance:
            for d in dets:
                if hasattr(d, "set_chance"):
                    d.set_chance(math.log(10))
        found = []
        for s in recs:
            for d in dets:
                for f in d.update(s):
                    found.append((f.kind, f.step, f.message, repr(sorted(f.evidence.items(), key=str)),
                                  f.where, f.severity))
            if s.step == 500:
                for d in dets:
                    d.reset()
        res.append((found, [repr(d.state_dict()) for d in dets]))
    return res


def per_detector(detect: Any, recs: list) -> dict[str, float]:
    out = {}
    for d in detect.default_detectors():
        if getattr(d, "sampled", None) is not None:
            continue  # not called on a plain step
        if hasattr(d, "set_chance"):
            d.set_chance(math.log(10))
        update = d.update
        t = time.perf_counter()
        for s in recs:
            update(s)
        out[type(d).__name__] = (time.perf_counter() - t) / len(recs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", metavar="SRC", help="another tree's src/ directory")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--patterns", type=int, default=60,
                    help="pattern streams for --compare (each run with and without a chance level)")
    a = ap.parse_args()
    trees = {"this": load(HERE)}
    if a.compare:
        trees["other"] = load(a.compare)
    streams = {k: healthy_stream(t[1]) for k, t in trees.items()}
    times: dict[str, dict[str, list[float]]] = {k: {} for k in trees}
    for _ in range(a.rounds):
        for k, (detect, _types) in trees.items():  # interleaved
            for name, v in per_detector(detect, streams[k]).items():
                times[k].setdefault(name, []).append(v)
    names = list(times["this"])
    print(f"{'detector':28s}" + "".join(f"{k + ' µs/step':>18s}" for k in trees))
    for n in names:
        print(f"{n:28s}" + "".join(f"{statistics.median(times[k].get(n, [math.nan])) * 1e6:18.2f}"
                                   for k in trees))
    print(f"{'all seven':28s}" + "".join(
        f"{sum(statistics.median(v) for v in times[k].values()) * 1e6:18.2f}" for k in trees))
    if a.compare:
        results = {}
        for k, (detect, types) in trees.items():
            strs = pattern_streams(types, a.patterns)
            results[k] = [decisions(detect, strs, c) for c in (False, True)]
        count = sum(len(found) for r in results["this"] for found, _ in r)
        same = results["this"] == results["other"]
        print(f"decisions on {2 * a.patterns} pattern streams: {count} findings; identical findings and final "
              f"states: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
