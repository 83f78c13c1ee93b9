"""trainguard inside the PyTorch examples' ``time_sequence_prediction`` (LBFGS), the way a user
adds it.

    python bench/lbfgs_trial.py EXAMPLES/time_sequence_prediction [--steps 4] [--src OTHER/src]

``EXAMPLES/time_sequence_prediction``: a checkout of pytorch/examples' folder (``train.py``,
``generate_sine_wave.py``: two ``nn.LSTMCell`` of 51 units in float64 learning sine waves with
``torch.optim.LBFGS(lr=0.8)``, whose ``step`` requires a closure; each step runs up to 20
evaluations). In a scratch copy the example's own ``generate_sine_wave.py`` writes the data, and
two scripts are written: ``train_bare.py``, the example as it is except that it reads the file it
just generated with ``torch.load(..., weights_only=False)`` (the example predates torch 2.6's
default, which refuses its NumPy array), and ``train_guarded.py``, where the user's one change is
``optimizer = tg.GuardedOptimizer(optim.LBFGS(seq.parameters(), lr=0.8), seq)``. Both run
``--steps`` steps (one after the other, two CPU threads each); the script compares what they
print (every closure evaluation's loss and each step's test loss, at full precision) and says
whether it is identical, with the number of evaluations and each run's wall time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _patch import replace_once  # noqa: E402


def _sub(old: str, new: str, text: str) -> str:
    return replace_once(old, new, text, "lbfgs_trial: train.py")


def patch(train: str, guarded: bool) -> str:
    s = _sub("data = torch.load('traindata.pt')",
             "data = torch.load('traindata.pt', weights_only=False)  # generated just now", train)
    if guarded:
        s = _sub("import torch.optim as optim\n",
                 "import torch.optim as optim\nimport trainguard as tg\n", s)
        s = _sub("optimizer = optim.LBFGS(seq.parameters(), lr=0.8)",
                 "optimizer = tg.GuardedOptimizer(optim.LBFGS(seq.parameters(), lr=0.8), seq)", s)
        s = s.rstrip("\n") + "\n    print(optimizer.guard.summary())\n"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("example", help="pytorch/examples' time_sequence_prediction folder")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "src"),
                    help="import trainguard from this src/ directory")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("train.py", "generate_sine_wave.py"):
            shutil.copy(os.path.join(a.example, f), tmp)
        env = dict(os.environ, PYTHONPATH=os.path.abspath(a.src), MPLBACKEND="Agg")
        subprocess.run([sys.executable, "generate_sine_wave.py"], cwd=tmp, check=True, env=env)
        train = open(os.path.join(tmp, "train.py")).read()
        out: dict[str, list[str]] = {}
        for kind in ("bare", "guarded"):
            with open(os.path.join(tmp, f"train_{kind}.py"), "w") as fh:
                fh.write(patch(train, kind == "guarded"))
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, f"train_{kind}.py", "--steps", str(a.steps)],
                               cwd=tmp, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t0
            if r.returncode:
                print(r.stdout[-2000:], r.stderr[-4000:])
                raise SystemExit(f"lbfgs_trial: the {kind} run failed")
            lines = r.stdout.splitlines()
            out[kind] = [ln for ln in lines if ln.startswith(("loss:", "test loss:"))]
            evals = sum(ln.startswith("loss:") for ln in lines)
            print(f"{kind:8s} {dt:7.1f} s, {evals} closure evaluations, last: "
                  f"{out[kind][-2] if len(out[kind]) > 1 else '?'}; {out[kind][-1] if out[kind] else '?'}")
            if kind == "guarded":
                print("\n".join("  " + ln for ln in lines if ln.startswith(("trainguard", "  "))))
        same = out["bare"] == out["guarded"]
        print(f"printed losses identical: {same} ({len(out['bare'])} lines)")


if __name__ == "__main__":
    main()
