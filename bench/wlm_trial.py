"""trainguard inside the PyTorch examples' word-level language model, the way a user adds it.

    python bench/wlm_trial.py EXAMPLES/word_language_model [--batches 120] [--epochs 1]
                              [--runs 2] [--eval-chars 60000] [--only bare|guarded]
                              [--src OTHER/src]

``--batches 0``: whole epochs.

``EXAMPLES/word_language_model``: a checkout of pytorch/examples' ``word_language_model``
(``main.py``, ``model.py``, ``data.py``; the 2-layer LSTM, 200 wide, on Wikitext-2 with its classic
recipe: plain SGD at lr 20, ``clip_grad_norm_(0.25)``, dropout 0.2, batch 20, BPTT 35). Nothing is
downloaded: the corpus is the checkout's ``data/wikitext-2``; when its ``train.txt`` is missing (a
snapshot that left the 10 MB file out), ``valid.txt`` is trained on instead. The validation and
test texts are cut to ``--eval-chars`` characters so that evaluation does not dominate.

Two scripts are written into a scratch copy: ``main_bare.py``, the example as it is plus a
``--max-batches`` limit (its own manual SGD update ``p.data.add_(p.grad, alpha=-lr)`` after
``clip_grad_norm_``), and ``main_guarded.py``, where the user's few changed lines are: an
``torch.optim.SGD(model.parameters(), lr=args.lr)`` for the manual update, ``guard =
tg.Guard(model, optimizer, clip=args.clip)``, ``guard.step(loss)`` in place of the clip and the
update, and the example's LR annealing (``lr /= 4`` when the validation loss stops improving)
written into the optimizer's param groups. The two run alternately, ``--runs`` times each, on
one CPU thread; the script prints each run's ms/batch (the example's own timing lines), its
losses and the Guard's lines.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _patch import replace_once  # noqa: E402


def _sub(old: str, new: str, text: str) -> str:
    return replace_once(old, new, text, "wlm_trial: main.py")


def patch(main: str, guarded: bool) -> str:
    s = _sub("parser.add_argument('--use-optimizer', action='store_true',",
             "parser.add_argument('--max-batches', type=int, default=0)\n"
             "parser.add_argument('--use-optimizer', action='store_true',", main)
    s = _sub("        if args.dry_run:\n            break\n",
             "        if args.dry_run or (args.max_batches and batch >= args.max_batches):\n"
             "            break\n", s)
    if not guarded:
        return s
    s = _sub("criterion = nn.NLLLoss()\n",
             "criterion = nn.NLLLoss()\n"
             "import trainguard as tg\n"
             "if not args.use_optimizer:\n"
             "    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)\n", s)
    s = _sub("        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)\n"
             "        if args.use_optimizer:\n"
             "            optimizer.step()\n"
             "        else:\n"
             "            for p in model.parameters():\n"
             "                p.data.add_(p.grad, alpha=-lr)\n",
             "        guard.step(loss)\n", s)
    s = _sub("lr = args.lr\n",
             "lr = args.lr\n"
             "guard = tg.Guard(model, optimizer, clip=args.clip)\n", s)
    s = _sub("            lr /= 4.0\n",
             "            lr /= 4.0\n"
             "            for group in optimizer.param_groups:\n"
             "                group['lr'] = lr\n", s)
    s = _sub("except KeyboardInterrupt:",
             "    guard.close()\n"
             "except KeyboardInterrupt:", s)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("example", help="pytorch/examples' word_language_model directory")
    ap.add_argument("--batches", type=int, default=120, help="training batches per epoch")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2, help="runs of each script, alternated")
    ap.add_argument("--eval-chars", type=int, default=60000)
    ap.add_argument("--log-interval", type=int, default=20)
    ap.add_argument("--only", choices=["bare", "guarded"], help="run one of the two scripts")
    ap.add_argument("--src", help="import trainguard from this src/ directory")
    a = ap.parse_args()
    src = a.src or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    work = tempfile.mkdtemp(prefix="wlm_trial_")
    for fname in ("main.py", "model.py", "data.py"):
        shutil.copy(os.path.join(a.example, fname), work)
    data_in = os.path.join(a.example, "data", "wikitext-2")
    data = os.path.join(work, "data")
    os.makedirs(data)
    train = os.path.join(data_in, "train.txt")
    if not os.path.exists(train) or os.path.getsize(train) == 0:
        print("wlm_trial: no train.txt in the checkout: training on valid.txt")
        train = os.path.join(data_in, "valid.txt")
    shutil.copy(train, os.path.join(data, "train.txt"))
    for fname in ("valid.txt", "test.txt"):
        with open(os.path.join(data_in, fname), encoding="utf-8") as fin:
            text = fin.read(a.eval_chars)
        with open(os.path.join(data, fname), "w", encoding="utf-8") as fout:
            fout.write(text[:text.rfind("\n") + 1])
    with open(os.path.join(work, "main.py"), encoding="utf-8") as f:
        original = f.read()
    for name, guarded in (("bare", False), ("guarded", True)):
        with open(os.path.join(work, f"main_{name}.py"), "w", encoding="utf-8") as f:
            f.write(patch(original, guarded))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
    ms: dict[str, list[float]] = {"bare": [], "guarded": []}
    for r in range(a.runs):
        for name in (["bare", "guarded"] if r % 2 == 0 else ["guarded", "bare"]):
            if a.only and name != a.only:
                continue
            cmd = [sys.executable, f"main_{name}.py", "--data", data, "--epochs", str(a.epochs),
                   "--max-batches", str(a.batches), "--log-interval", str(a.log_interval),
                   "--save", os.path.join(work, f"{name}.pt")]
            out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"wlm_trial: {name} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
            # the first timing line of an epoch includes its warm-up: the later ones are read
            times = [float(x) for x in re.findall(r"ms/batch\s+([\d.]+)", out.stdout)]
            steady = times[1:] if len(times) > 1 else times
            ms[name].extend(steady)
            print(f"--- run {r + 1}, {name}: ms/batch {', '.join(f'{t:.0f}' for t in times)}")
            for line in out.stdout.splitlines():
                if "loss" in line and ("end of epoch" in line or "End of training" in line):
                    print("   ", line.strip())
            for line in (out.stdout + out.stderr).splitlines():  # the Guard's console lines
                if line.startswith("trainguard") or (line.startswith("  ") and name == "guarded"):
                    print("   ", line.rstrip())
    if a.only:
        print(f"\nmedian ms/batch after each epoch's first timing line: {a.only} "
              f"{statistics.median(ms[a.only]):.1f}; scratch copy: {work}")
        return
    b, g = statistics.median(ms["bare"]), statistics.median(ms["guarded"])
    print(f"\nmedian ms/batch after each epoch's first timing line: bare {b:.1f}, guarded {g:.1f}"
          f" (guarded/bare {g / b:.3f}); scratch copy: {work}")


if __name__ == "__main__":
    main()
