"""Healthy-step cost of the Guard with each sink attached at its default cadence (statistics
every ``log_every=10`` steps), measured side by side with the bare loop and the Guard alone.

    python bench/sinks_overhead.py [--model mlp|cnn] [--rounds 9] [--block 30] [--threads 1]

Same method as bench/overhead.py (its models and step function): blocks of ``--block`` steps
interleaved round-robin, each divided by the bare block of its round, median over rounds. The
sinks write to a temporary folder: JSONL (``log=``), TensorBoard, MLflow (a local file store) and
W&B (offline mode); a sink whose library is missing is left out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from overhead import _loop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="tg-sinks-")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    os.environ.setdefault("WANDB_SILENT", "true")
    variants = {"bare": _loop(a.model, a.width), "guard": _loop(a.model, a.width, guard={}),
                "guard + JSONL log": _loop(a.model, a.width, guard={"log": os.path.join(tmp, "e.jsonl")})}
    from trainguard import sinks
    try:
        variants["guard + TensorBoardSink"] = _loop(
            a.model, a.width, guard={"sinks": [sinks.TensorBoardSink(os.path.join(tmp, "tb"))]})
    except ImportError:
        pass
    try:
        from mlflow.tracking import MlflowClient
        uri = "file://" + os.path.join(tmp, "mlruns")
        c = MlflowClient(tracking_uri=uri)
        rid = c.create_run(c.create_experiment("bench")).info.run_id
        variants["guard + MLflowSink"] = _loop(
            a.model, a.width, guard={"sinks": [sinks.MLflowSink(rid, tracking_uri=uri)]})
    except ImportError:
        pass
    try:
        variants["guard + WandbSink (offline)"] = _loop(
            a.model, a.width, guard={"sinks": [sinks.WandbSink(project="bench", mode="offline",
                                                               dir=tmp)]})
    except ImportError:
        pass
    gen = torch.Generator().manual_seed(0)
    shape = (64,) if a.model == "mlp" else (3, 32, 32)
    xs = torch.randn(a.block, 256 if a.model == "mlp" else 32, *shape, generator=gen)
    ys = torch.randint(0, 10, (a.block, xs.shape[1]), generator=gen)
    steps = {n: b() for n, b in variants.items()}
    for fn in steps.values():
        for i in range(10):
            fn(xs[i], ys[i])
    times: dict[str, list[float]] = {n: [] for n in steps}
    from trainguard.progress import Progress
    with Progress(a.rounds, "sink overhead rounds", enabled=True) as progress:
        for r in range(a.rounds):
            progress.start(f"round {r + 1}")
            order = list(steps) if r % 2 == 0 else list(reversed(steps))
            for n in order:
                t0 = time.perf_counter()
                for i in range(a.block):
                    steps[n](xs[i], ys[i])
                times[n].append(time.perf_counter() - t0)
    bare = times["bare"]
    guard = times["guard"]
    print(f"model: {a.model} width {a.width}, Adam, {a.threads} thread(s); bare "
          f"{statistics.median(bare) / a.block * 1e3:.2f} ms/step; {a.rounds} rounds x {a.block} steps")
    print(f"{'variant':<30}{'ms/step':>9}{'vs bare':>10}{'vs guard':>10}{'added us/step':>15}")
    for n, ts in times.items():
        rb = statistics.median(t / b for t, b in zip(ts, bare))
        rg = statistics.median(t / g for t, g in zip(ts, guard))
        us = statistics.median((t - g) / a.block * 1e6 for t, g in zip(ts, guard))
        print(f"{n:<30}{statistics.median(ts) / a.block * 1e3:>9.2f}{rb:>10.3f}{rg:>10.3f}{us:>15.0f}")


if __name__ == "__main__":
    main()
