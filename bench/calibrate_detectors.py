"""Replay healthy training streams through every default detector and count false alarms per
rule: ``python bench/calibrate_detectors.py [--steps 1500] [--seeds 2] [--zoo] [--resumed] [--noise]``.

Streams: the digits MLP (64-128-10, ReLU) with SGD lr 0.05 / SGD momentum 0.9 lr 0.02 /
Adam lr 1e-3, at batch 4, 8 and 32 (``--batches 1,2`` for others; momentum below batch 4 takes
lr 0.02 x batch / 8: at 0.02 its weights blow up, a true failure), for ``--steps`` steps and
``--seeds`` seeds (the streams the log-space spike rules of detect/spikes.py were calibrated
on). ``--zoo`` adds every
healthy zoo scenario (trainguard/zoo/scenarios/healthy_*.py, curvature controls).
``--resumed`` adds runs that start from a trained model, as a user resumes with a fresh Guard:
the digits MLP trained ``--steps`` steps bare (Adam batch 32, momentum batch 32, SGD batch 8),
then ``--steps`` more recorded, with its optimizer state kept and with a fresh optimizer; and a
64-64 tanh MLP fitted to sin(2x) by MSE (Adam lr 3e-3, batch 32; noise 0, 0.05, 0.3 on the
targets), trained 3,000 steps bare, then resumed likewise. Their first losses are already
near the floor, which the rules that measure progress from the start must not take for a
ruin (detect/progress.py: ``NOISE_MARGIN``; stats.chance_level: a trained start).
``--noise`` also prints each stream's start noise (``detect.progress.start_noise`` of its first 20
losses), the figure ``NOISE_MARGIN`` is compared against.

Each stream is recorded once with a monitor-only Guard (findings only, no remedies, so the
stream is the bare run's), then each detector is replayed over the recorded StepStats with
its default thresholds, and with each threshold moved one notch toward sensitivity, to
show the margin. A "false alarm" is a severe finding (plateau is info, not counted).
"""
from __future__ import annotations

import argparse
import copy
from collections import Counter

import torch
from torch import nn

import trainguard as tg
from trainguard.detect import default_detectors
from trainguard.detect.progress import DivergenceDetector
from trainguard.detect.spikes import GradExplosionDetector, LossSpikeDetector

torch.set_num_threads(1)


def record(model, opt, batches, steps, loss_fn=nn.functional.cross_entropy):
    g = tg.Guard(model, opt, console=False, policy=tg.Policy.monitor_only(), clip=None,
                 sample_every=50)
    it = batches()
    stream = []
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        g.step(loss)
        stream.append(copy.copy(g.history[-1]))
    g.close()
    return stream, g.chance_loss


def digits_streams(steps: int, seeds: int, batches: tuple[int, ...] = (4, 8, 32)):
    from trainguard.zoo.scenarios._common_a import digits, minibatches, mlp
    xtr, ytr, _, _ = digits()
    opts = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05),
            "momentum": lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-3)}
    for seed in range(seeds):
        for name, make in opts.items():
            for batch in batches:
                torch.manual_seed(seed)
                m = mlp([64, 128, 10])
                opt = make(m.parameters())
                if name == "momentum" and batch < 4:
                    # 0.02 at batch 1-2 is a real failure (the weights blow up: losses of 1e23
                    # by step 10,000, found by the divergence rules): the LR scaled with the batch
                    opt.param_groups[0]["lr"] = 0.02 * batch / 8
                yield (f"digits-{name}-b{batch}-s{seed}",
                       record(m, opt, minibatches(xtr, ytr, batch, seed), steps))


def zoo_streams(seeds: int):
    from trainguard.zoo import REGISTRY
    import trainguard.zoo.scenarios  # noqa: F401
    for s in REGISTRY.values():
        if s.category != "healthy":
            continue
        for seed in range(seeds):
            st = s.build(seed)
            fwd = st.forward or (lambda m, x: m(x))
            g = tg.Guard(st.model, st.optimizer, console=False, clip=None,
                         policy=tg.Policy.monitor_only(), **st.guard_kwargs)
            it = st.batches()
            stream = []
            for _ in range(st.steps):
                x, y = next(it)
                st.optimizer.zero_grad(set_to_none=True)
                loss = st.loss_fn(fwd(st.model, x), y)
                loss.backward()
                g.step(loss)
                stream.append(copy.copy(g.history[-1]))
                if st.scheduler is not None:
                    st.scheduler.step(float(loss.detach())) if st.scheduler_kind == "plateau" \
                        else st.scheduler.step()
            g.close()
            yield f"{s.name}-s{seed}", (stream, g.chance_loss)


def resumed_streams(steps: int, seeds: int):
    """Runs that start from a trained model (see the module docstring)."""
    from trainguard.zoo.scenarios._common_a import digits, minibatches, mlp
    xtr, ytr, _, _ = digits()
    opts = {"adam-b32": (lambda p: torch.optim.Adam(p, lr=1e-3), 32),
            "momentum-b32": (lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9), 32),
            "sgd-b8": (lambda p: torch.optim.SGD(p, lr=0.05), 8)}

    def train(m, opt, batches, n, loss_fn=nn.functional.cross_entropy):
        it = batches()
        for _ in range(n):
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            loss_fn(m(x), y).backward()
            opt.step()

    for seed in range(seeds):
        for name, (make, batch) in opts.items():
            torch.manual_seed(seed)
            m = mlp([64, 128, 10])
            o = make(m.parameters())
            train(m, o, minibatches(xtr, ytr, batch, seed), steps)
            for fresh in (False, True):
                m2 = copy.deepcopy(m)
                o2 = make(m2.parameters())
                if not fresh:
                    o2.load_state_dict(o.state_dict())
                yield (f"resumed-digits-{name}-{'fresh-opt' if fresh else 'kept-opt'}-s{seed}",
                       record(m2, o2, minibatches(xtr, ytr, batch, seed + 100), steps))
        for noise in (0.0, 0.05, 0.3):
            torch.manual_seed(seed)
            x = torch.linspace(-3, 3, 4096).unsqueeze(1)
            y = torch.sin(2 * x) + noise * torch.randn_like(x)

            def batches(s=seed, x=x, y=y):
                gen = torch.Generator().manual_seed(s)
                while True:
                    i = torch.randint(0, len(x), (32,), generator=gen)
                    yield x[i], y[i]
            m = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 1))
            o = torch.optim.Adam(m.parameters(), lr=3e-3)
            train(m, o, batches, 3000, nn.functional.mse_loss)
            for fresh in (False, True):
                m2 = copy.deepcopy(m)
                o2 = torch.optim.Adam(m2.parameters(), lr=3e-3)
                if not fresh:
                    o2.load_state_dict(o.state_dict())
                yield (f"resumed-sine-noise{noise}-{'fresh-opt' if fresh else 'kept-opt'}-s{seed}",
                       record(m2, o2, lambda s=seed + 100, x=x, y=y: batches(s, x, y), steps,
                              nn.functional.mse_loss))


def variants():
    """(label, factory): the defaults and one notch more sensitive per spike/divergence rule."""
    yield "defaults", default_detectors
    yield "loss_spike jump 2.5->1.5", lambda: [LossSpikeDetector(jump=1.5)]
    yield "loss_spike z 4->3", lambda: [LossSpikeDetector(z=3.0)]
    yield "grad_explosion jump 3->2", lambda: [GradExplosionDetector(jump=2.0)]
    yield "grad_explosion ratio 10->5", lambda: [GradExplosionDetector(ratio=5.0)]
    yield "divergence factor 4->2", lambda: [DivergenceDetector(factor=2.0)]
    yield "divergence fast 1e4->1e3", lambda: [DivergenceDetector(fast_factor=1e3)]
    yield "divergence chance margin 0.5->0.25", lambda: [DivergenceDetector(chance_margin=0.25)]
    yield "divergence giveback 0.8->0.6", lambda: [DivergenceDetector(giveback=0.6)]
    yield "divergence start x4/20 -> x2/10", lambda: [DivergenceDetector(start_factor=2.0,
                                                                         start_patience=10)]
    yield "grad_explosion early 100->10", lambda: [GradExplosionDetector(early_ratio=10.0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--zoo", action="store_true")
    ap.add_argument("--resumed", action="store_true",
                    help="only the runs that start from a trained model")
    ap.add_argument("--batches", default="4,8,32",
                    help="the digits MLP's batch sizes, comma-separated (default 4,8,32)")
    ap.add_argument("--noise", action="store_true",
                    help="print each stream's start noise (first 20 losses, log space)")
    a = ap.parse_args()
    if a.resumed:
        streams = list(resumed_streams(a.steps, a.seeds))
    else:
        batches = tuple(int(b) for b in a.batches.split(","))
        streams = list(digits_streams(a.steps, a.seeds, batches))
    if a.zoo:
        streams += list(zoo_streams(a.seeds))
    if a.noise:
        from trainguard.detect.progress import START_STEPS, start_noise
        for name, (stream, _c) in streams:
            first = [s.loss for s in stream[:START_STEPS]]
            n = start_noise(first) if all(v > 0 for v in first) else None
            print(f"  start noise {name:46s} " + (f"{n:.3f}" if n is not None else "n/a"))
    print(f"{len(streams)} healthy streams, {sum(len(s) for _, (s, _c) in streams)} steps, "
          f"{sum(c is not None for _, (_s, c) in streams)} with a chance level (cross-entropy)")
    for label, make in variants():
        per_rule: Counter[str] = Counter()
        runs: Counter[str] = Counter()
        for name, (stream, chance) in streams:
            dets = make()
            for d in dets:
                if chance is not None and hasattr(d, "set_chance"):
                    d.set_chance(chance)
            hit = set()
            for st in stream:
                for d in dets:
                    for f in d.update(st):
                        if f.severe:
                            per_rule[f"{type(d).__name__}:{f.kind}"] += 1
                            hit.add(f"{type(d).__name__}:{f.kind}")
            for h in hit:
                runs[h] += 1
                if label == "defaults":
                    print(f"  false alarm: {h} on {name}")
        summary = ", ".join(f"{k} {v} findings in {runs[k]} runs" for k, v in per_rule.items())
        print(f"{label:28s} {summary or '0 false alarms'}")


if __name__ == "__main__":
    main()
