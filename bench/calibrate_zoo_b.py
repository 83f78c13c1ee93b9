"""Calibrate zoo part-B scenarios: python bench/calibrate_zoo_b.py MODULE [SEEDS] [MODES]
prints pass/fail, metric, findings {kind: [count, first step]} and actions per run."""
import sys, time, importlib, collections
import torch
torch.set_num_threads(1)
import trainguard as tg
from trainguard.zoo.base import train, REGISTRY

def guard_factory(s):
    return tg.Guard(s.model, s.optimizer, scaler=s.scaler, console=False, **s.guard_kwargs)

def summarize(r):
    f = collections.OrderedDict()
    for x in r.findings:
        f.setdefault(x.kind, [0, x.step]); f[x.kind][0] += 1
    a = collections.OrderedDict()
    for x in r.actions:
        a.setdefault(x.kind, [0, x.step]); a[x.kind][0] += 1
    return dict(f), dict(a)

def main(mod, seeds, modes):
    importlib.import_module(f"trainguard.zoo.scenarios.{mod}")
    sc = [s for s in REGISTRY.values() if s.build.__module__.endswith(mod)]
    for s in sc:
        for seed in seeds:
            for mode in modes:
                setup = s.build(seed)
                t = time.perf_counter()
                r = train(setup, mode, guard_factory=guard_factory if mode == "guarded" else None)
                fs, acts = summarize(r)
                print(f"{s.name} seed={seed} {mode:7s} pass={s.passed(r)} metric={r.metric:.4g} final={r.final_loss:.4g} t={time.perf_counter()-t:.1f}s err={r.error} F={fs} A={acts}", flush=True)

if __name__ == "__main__":
    mod = sys.argv[1]
    seeds = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0, 1, 2]
    modes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["bare", "guarded"]
    main(mod, seeds, modes)
