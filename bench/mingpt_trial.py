"""trainguard inside karpathy/minGPT's ``Trainer``, the way a user adds it: the adder project.

    python bench/mingpt_trial.py MINGPT [--iters 2000] [--lr 5e-4] [--src SRC]

``MINGPT``: a checkout of karpathy/minGPT. Its ``Trainer`` builds the optimizer itself
(``model.configure_optimizers``), clips, and calls ``optimizer.step()`` with no closure; the
user's change is three lines after the model is built, handing the Trainer a
``GuardedOptimizer``::

    import trainguard as tg
    _conf = model.configure_optimizers
    model.configure_optimizers = lambda c: tg.GuardedOptimizer(_conf(c), model)

No loss reaches that optimizer: the Guard reads the one minGPT's ``forward(idx, targets)``
returns (``trainguard/model_loss.py``). The script writes ``adder_bare.py`` and
``adder_guarded.py`` into a scratch copy of the checkout, runs both (one thread each, side by
side, ``num_workers=0``, ``--iters`` iterations at ``--lr``) and prints their train and test
scores (every 500 iterations, as the project evaluates), whether they are identical, and the
Guard's summary. The figures in the README: the defaults (healthy) and ``--lr 0.05`` (100×).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _patch import editor  # noqa: E402


def patch(src: str) -> str:
    """adder.py with the GuardedOptimizer handed to minGPT's Trainer."""
    sub = editor("mingpt_trial: projects/adder/adder.py")
    s = sub("    model = GPT(config.model)\n",
            "    model = GPT(config.model)\n"
            "    import trainguard as tg\n"
            "    _conf = model.configure_optimizers\n"
            "    model.configure_optimizers = lambda c: tg.GuardedOptimizer(_conf(c), model)\n", src)
    return sub("    trainer.run()\n", "    trainer.run()\n    trainer.optimizer.guard.close()\n", s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mingpt", help="a checkout of karpathy/minGPT")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    a = ap.parse_args()
    src = a.src or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    work = tempfile.mkdtemp(prefix="mingpt_trial_")
    shutil.copytree(os.path.join(a.mingpt, "mingpt"), os.path.join(work, "mingpt"))
    with open(os.path.join(a.mingpt, "projects", "adder", "adder.py"), encoding="utf-8") as f:
        original = f.read()
    scripts = {"bare": original, "guarded": patch(original)}
    for name, text in scripts.items():
        with open(os.path.join(work, f"adder_{name}.py"), "w", encoding="utf-8") as f:
            f.write(text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([work, os.path.abspath(src)]),
               OMP_NUM_THREADS="1")

    def run(name: str) -> str:
        cmd = [sys.executable, f"adder_{name}.py", f"--trainer.max_iters={a.iters}",
               "--trainer.num_workers=0", f"--trainer.learning_rate={a.lr}",
               f"--system.work_dir='{os.path.join(work, 'out_' + name)}'"]
        out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"mingpt_trial: {name} failed:\n{out.stderr[-3000:]}")
        return out.stdout + out.stderr  # the Guard's console (its findings, its summary): stderr

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = dict(zip(scripts, pool.map(run, scripts)))
    scores = {n: [ln for ln in o.splitlines() if "final score" in ln] for n, o in outs.items()}
    same = "identical" if scores["bare"] == scores["guarded"] else "DIFFERENT"
    print(f"minGPT adder, {a.iters} iterations at lr {a.lr}: the scores of the bare and the "
          f"guarded run are {same}")
    for n in (("guarded",) if same == "identical" else ("bare", "guarded")):
        for ln in scores[n]:
            print(f"    {n}: {ln}")
    text = outs["guarded"]
    print(text[text.find("trainguard summary"):].rstrip())
    print(f"scratch copy: {work}")


if __name__ == "__main__":
    main()
