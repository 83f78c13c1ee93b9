"""How many graphs dynamo compiles for a guarded ``torch.compile`` model (issue #15).

    python bench/compile_recompiles.py [--steps 600] [--src OTHER/src]

A small MLP compiled with ``backend="eager"`` (dynamo's guards and recompiles, no code
generation: seconds on a CPU), trained 600 steps under a Guard, once with sampled steps off
and once at the default cadence (every 50 steps); the Guard given the compiled module, and
given the raw module while the loop calls the compiled one. Every recompile is a full
compilation on a real backend (seconds to minutes on a large model), and after
``torch._dynamo.config.recompile_limit`` (8) recompiles of one frame dynamo runs it eagerly for
good. ``--src``: import trainguard from another tree (to compare versions).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tree import use_tree  # noqa: E402

_SRC = use_tree()  # this checkout's src/, or --src DIR (before the import below)
import torch  # noqa: E402
import torch._dynamo as dynamo  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import trainguard as tg  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--src", default=None, help="import trainguard from this src/ directory")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    print(f"trainguard from {os.path.abspath(_SRC)}; {a.steps} steps")
    for how in ("compiled module given", "raw module given"):
        for every in (10**9, 50):
            dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            net = Net()
            call = torch.compile(net, backend="eager")
            o = torch.optim.Adam(net.parameters(), lr=1e-3)
            g = tg.Guard(call if how.startswith("compiled") else net, o, console=False,
                         sample_every=every)
            gen = torch.Generator().manual_seed(1)
            for _ in range(a.steps):
                o.zero_grad()
                loss = nn.functional.cross_entropy(call(torch.randn(16, 8, generator=gen)),
                                                   torch.randint(0, 4, (16,), generator=gen))
                loss.backward()
                g.step(loss)
            g.close()
            label = "sampled steps off" if every == 10**9 else f"sample_every={every}"
            print(f"{how:<22} {label:<18} graphs compiled: {counters['stats']['unique_graphs']}")


if __name__ == "__main__":
    main()
