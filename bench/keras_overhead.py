"""Per-step cost of the Keras Guard against bare ``model.fit``, side by side.

    python bench/keras_overhead.py [--rounds 7] [--backend tensorflow|torch]   (one thread)

An MLP 64-512x3-10 (Adam, batch 256, 40 batches per epoch) fitted bare and with
``Guard`` (wrapped optimizer + callback), in interleaved rounds; each round times one epoch of
each after a warm-up epoch, and the median ratio guarded/bare is reported with ms per step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--backend", default="tensorflow")
a = ap.parse_args()
os.environ["KERAS_BACKEND"] = a.backend
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import numpy as np  # noqa: E402
import keras  # noqa: E402

# one intra-op thread, as bench/overhead.py: stable timings on a shared 2-core machine
if a.backend == "tensorflow":
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
else:
    import torch
    torch.set_num_threads(1)

from trainguard.integrations.keras import Guard  # noqa: E402

STEPS, BATCH = 40, 256


def make(guarded: bool):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((64,))] + [keras.layers.Dense(512, activation="relu")
                                                for _ in range(3)] + [keras.layers.Dense(10)])
    opt = keras.optimizers.Adam(1e-3)
    cbs = []
    if guarded:
        g = Guard()
        opt = g.wrap(opt)
        cbs = [g]
    m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m, cbs


rng = np.random.default_rng(0)
x = rng.normal(size=(STEPS * BATCH, 64)).astype("float32")
y = rng.integers(0, 10, size=(STEPS * BATCH,))
runs = {g: make(g) for g in (False, True)}
for m, cbs in runs.values():  # warm-up (tracing)
    m.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=cbs)
times: dict[bool, list[float]] = {False: [], True: []}
for r in range(a.rounds):
    for g in ((False, True) if r % 2 == 0 else (True, False)):
        m, cbs = runs[g]
        t0 = time.perf_counter()
        m.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=cbs)
        times[g].append((time.perf_counter() - t0) / STEPS * 1e3)
ratio = statistics.median(g / b for g, b in zip(times[True], times[False]))
print(f"Keras {keras.__version__} ({a.backend}), MLP 64-512x3-10, Adam, batch {BATCH}: bare "
      f"{statistics.median(times[False]):.2f} ms/step, guarded {statistics.median(times[True]):.2f} "
      f"ms/step, ratio {ratio:.3f} (median of {a.rounds} interleaved epochs)")
