"""trainguard inside karpathy/makemore, the way a user adds it: every model type at its defaults.

    python bench/makemore_trial.py MAKEMORE [--steps 2001] [--types bigram,mlp,rnn,gru,bow,transformer]
                                   [--lr 5e-4] [--src OTHER/src] [--jobs 2]

``MAKEMORE``: a checkout of karpathy/makemore (``makemore.py`` and its ``names.txt``, 32,032
names; nothing is downloaded). Its recipe: AdamW lr 5e-4, weight decay 0.01, betas (0.9, 0.99),
batch 32, character-level cross-entropy with ``ignore_index=-1``, the model returning
``(logits, loss)``. The scratch copy replaces TensorBoard's ``SummaryWriter`` with a stub (not
installed here), runs the data loader in the main process and skips the sampling; the guarded copy adds the user's two lines, ``guard = tg.Guard(model, optimizer,
log=...)`` and ``guard.step(loss)`` in place of ``optimizer.step()``, and prints the Guard's
findings and actions at the end.

For each ``--types`` model the bare and the guarded script run ``--steps`` steps on one CPU
thread (``--jobs`` at a time); the script prints the example's own evaluation lines (train and
test loss every 500 steps), whether the two runs' lines are identical, the Guard's findings
and actions, and the median of the example's own step times (printed every 10 steps, the
first 100 steps left out) of each run with their ratio: a time figure only with ``--jobs 1``
on a quiet machine. ``--src``: import trainguard from another ``src/`` (the code before a
change).

``--doctor``: instead of training, run ``trainguard.doctor`` on each ``--types`` model as the
example builds it (seed 3407, its AdamW, batches of 32 names, the loss of its ``(logits, loss)``
output's logits) and print each report.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _patch import editor  # noqa: E402

TYPES = ("bigram", "mlp", "rnn", "gru", "bow", "transformer")


_sub = editor("makemore_trial: makemore.py")


def patch(src: str, guarded: bool) -> str:
    s = _sub("from torch.utils.tensorboard import SummaryWriter\n",
             "class SummaryWriter:  # makemore_trial: TensorBoard is not installed\n"
             "    def __init__(self, **kw): pass\n"
             "    def add_scalar(self, *a): pass\n"
             "    def flush(self): pass\n", src)
    s = _sub("if step > 0 and step % 200 == 0:", "if False:  # makemore_trial: no sampling", s)
    if not guarded:
        return s
    s = _sub("    # init dataloader\n",
             "    import trainguard as tg\n"
             "    guard = tg.Guard(model, optimizer, log=os.path.join(args.work_dir, 'trainguard.jsonl'))\n"
             "    # init dataloader\n", s)
    s = _sub("        optimizer.step()\n", "        guard.step(loss)\n", s)
    s = _sub("        if args.max_steps >= 0 and step >= args.max_steps:\n            break\n",
             "        if args.max_steps >= 0 and step >= args.max_steps:\n"
             "            guard.close()\n"
             "            print('FINDINGS', [(f.step, f.kind, f.severity, f.message) for f in guard.findings])\n"
             "            print('ACTIONS', [(a.step, a.kind) for a in guard.actions])\n"
             "            break\n", s)
    return s


def run(work: str, kind: str, name: str, a: argparse.Namespace, env: dict) -> str:
    cmd = [sys.executable, f"makemore_{name}.py", "-i", "names.txt", "-o",
           os.path.join(work, f"out_{kind}_{name}"), "--type", kind, "--max-steps", str(a.steps),
           "--num-workers", "0", "--learning-rate", str(a.lr)]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"makemore_trial: {kind} {name} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return out.stdout


DOCTOR = """import sys, torch
import trainguard as tg
import makemore_bare as mm
torch.set_num_threads(1)
torch.manual_seed(3407)
train, _ = mm.create_datasets("names.txt")
cfg = mm.ModelConfig(vocab_size=train.get_vocab_size(), block_size=train.get_output_length(),
                     n_layer=4, n_head=4, n_embd=64, n_embd2=64)
build = {{"transformer": lambda: mm.Transformer(cfg), "bigram": lambda: mm.Bigram(cfg),
         "mlp": lambda: mm.MLP(cfg), "rnn": lambda: mm.RNN(cfg, cell_type="rnn"),
         "gru": lambda: mm.RNN(cfg, cell_type="gru"), "bow": lambda: mm.BoW(cfg)}}
model = build[sys.argv[1]]()
opt = torch.optim.AdamW(model.parameters(), lr={lr}, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8)
loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))

# makemore's forward(idx, targets) returns (logits, loss): the doctor reads that loss
print(tg.doctor(model, None, loader, opt, progress=False))
"""


def doctor(work: str, kinds: list[str], a: argparse.Namespace, env: dict) -> None:
    with open(os.path.join(work, "doctor_run.py"), "w", encoding="utf-8") as f:
        f.write(DOCTOR.format(lr=a.lr))
    for k in kinds:
        out = subprocess.run([sys.executable, "doctor_run.py", k], cwd=work, env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"makemore_trial: doctor on {k} failed:\n{out.stderr[-3000:]}")
        report = out.stdout[out.stdout.find("trainguard doctor"):]
        print(f"--- {k}\n{report.rstrip()}")


def step_times(out: str) -> list[float]:
    """The example's own ``step N | loss L | step time T ms`` lines, after step 100."""
    return [float(t) for n, t in re.findall(r"step (\d+) \| loss \S+ \| step time ([\d.]+)ms", out)
            if int(n) >= 100]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("makemore", help="a checkout of karpathy/makemore")
    ap.add_argument("--steps", type=int, default=2001)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    ap.add_argument("--doctor", action="store_true", help="run the doctor on each model instead")
    a = ap.parse_args()
    kinds = [k for k in a.types.split(",") if k]
    bad = [k for k in kinds if k not in TYPES]
    if bad:
        raise SystemExit(f"makemore_trial: --types expects some of {', '.join(TYPES)}, got {bad}")
    src = a.src or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    work = tempfile.mkdtemp(prefix="makemore_trial_")
    shutil.copy(os.path.join(a.makemore, "names.txt"), work)
    with open(os.path.join(a.makemore, "makemore.py"), encoding="utf-8") as f:
        original = f.read()
    for name, guarded in (("bare", False), ("guarded", True)):
        with open(os.path.join(work, f"makemore_{name}.py"), "w", encoding="utf-8") as f:
            f.write(patch(original, guarded))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
    if a.doctor:
        doctor(work, kinds, a, env)
        return
    jobs = [(k, n) for k in kinds for n in ("bare", "guarded")]
    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        outs = dict(zip(jobs, pool.map(lambda j: run(work, j[0], j[1], a, env), jobs)))
    for k in kinds:
        evals = {n: [ln for ln in outs[(k, n)].splitlines() if "train loss" in ln]
                 for n in ("bare", "guarded")}
        same = "identical" if evals["bare"] == evals["guarded"] else "DIFFERENT"
        print(f"--- {k}: evaluation lines of the bare and the guarded run {same}")
        for ln in evals["guarded"]:
            m = re.match(r"step (\d+) train loss: ([\d.]+) test loss: ([\d.]+)", ln)
            print(f"    step {m.group(1)}: train {float(m.group(2)):.4f}, test {float(m.group(3)):.4f}"
                  if m else f"    {ln}")
        if same != "identical":
            for ln in evals["bare"]:
                print(f"    bare: {ln}")
        for ln in outs[(k, "guarded")].splitlines():
            if ln.startswith(("FINDINGS", "ACTIONS")):
                print(f"    {ln}")
        ms = {n: statistics.median(step_times(outs[(k, n)])) for n in ("bare", "guarded")}
        print(f"    median step time: bare {ms['bare']:.2f} ms, guarded {ms['guarded']:.2f} ms "
              f"(guarded/bare {ms['guarded'] / ms['bare']:.3f})")
    print(f"scratch copy: {work}")


if __name__ == "__main__":
    main()
