"""Host time to build one healthy step's record from the transferred norms: the short path
(``stats.quick_stats``: plain Python up to ``QUICK_GROUPING`` tensors, numpy above) against the
general path (``stats.build_stats``), on models of 6, 80 and 998 parameter tensors.

    python bench/step_record.py [--number 2000] [--quick-grouping N]

Timed warm (the same call repeated), one torch thread: the figures that set ``QUICK_GROUPING``.
``--quick-grouping 100000`` times the all-Python record on every model (what it cost before the
threshold). Both paths must give the same record, to the last bit; the script checks it.
"""
from __future__ import annotations

import argparse
import os
import sys
import timeit

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from trainguard import stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--quick-grouping", type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.quick_grouping is not None:
        stats.QUICK_GROUPING = a.quick_grouping
    print(f"QUICK_GROUPING = {stats.QUICK_GROUPING}; µs per record, warm, median of 5 x {a.number}")
    for layers in (3, 40, 499):
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(torch.randn(4, 16)).sum().backward()
        probe = stats.Probe(m, opt)
        vec, idx, _ = probe.measure_device(torch.tensor(1.0), with_params=False)
        host = vec.tolist()
        gn, loss = host[:-1], host[-1]
        q = stats.quick_stats(0, probe, gn, idx, loss)
        b = stats.build_stats(0, probe, np.asarray(gn), idx, None, loss)
        assert q is not None and q.grad_norms == b.grad_norms and q.grad_norm == b.grad_norm

        def per_call(f) -> float:
            return float(np.median(timeit.repeat(f, number=a.number, repeat=5))) / a.number * 1e6

        tq = per_call(lambda: stats.quick_stats(0, probe, gn, idx, loss))
        tb = per_call(lambda: stats.build_stats(0, probe, np.asarray(gn), idx, None, loss))
        print(f"{len(gn):5d} tensors: short path {tq:7.1f} µs   general path {tb:7.1f} µs")


if __name__ == "__main__":
    main()
