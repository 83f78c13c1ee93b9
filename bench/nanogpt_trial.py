"""trainguard inside nanoGPT's own ``train.py``, the way a user adds it (issue #15 trial).

    python bench/nanogpt_trial.py NANOGPT_DIR --text CORPUS.txt [--iters 400] [--lr 1e-3]
                                  [--eval-interval N] [--decay-iters N] [--compile]
                                  [--only bare|guarded] [--src OTHER/src]

``NANOGPT_DIR``: a checkout of karpathy/nanoGPT (nothing is downloaded: ``--text`` is the
character corpus, written as ``data/shakespeare_char/input.txt`` and prepared with nanoGPT's own
``prepare.py``). The script writes ``train_guarded.py`` beside ``train.py``: the Guard built on the
model and optimizer (``scaler=scaler, clip=grad_clip``), each micro-batch's own loss shown with
``guard.observe_loss``, and ``guard.step()`` in place of nanoGPT's clip / ``scaler.step`` /
``scaler.update``. It then runs the bare and the guarded script with the same tiny CPU config
(4 layers, width 128, context 64, batch 8, accumulation 4, dropout 0.1, AdamW, float32, warm-up
20 iterations, cosine decay to lr/10) and prints each run's evaluation losses and the Guard's
lines. The figures: ``--iters 400`` (healthy), ``--iters 400 --lr 0.1`` (100x the LR), and
``--iters 120 --eval-interval 60 --decay-iters 400 --compile``.

``--doctor DROPOUT``: instead, run ``trainguard.doctor`` on the trial's model (the same size,
this dropout, AdamW from nanoGPT's own ``configure_optimizers`` at ``--lr``) over 8 batches of
the prepared corpus, and print its report.

The figures in the README and docs/frameworks.md came from a 1.1 MB corpus of this machine's
package documentation (``*.md``/``*.rst``/``*.txt`` files, printable ASCII), so they are
reproducible on this machine, not byte for byte elsewhere.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _patch import editor  # noqa: E402

CONFIG = """out_dir = {out!r}
eval_interval = {eval_interval}
eval_iters = 10
log_interval = 25
always_save_checkpoint = False
dataset = 'shakespeare_char'
gradient_accumulation_steps = 4
batch_size = 8
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.1
learning_rate = {lr}
max_iters = {iters}
lr_decay_iters = {decay}
min_lr = {min_lr}
beta2 = 0.99
warmup_iters = {warmup}
device = 'cpu'
dtype = 'float32'
compile = {compile}
"""


def patch(train: str) -> str:
    """nanoGPT's train.py with the Guard added as the README says."""
    sub = editor("nanogpt_trial: train.py")
    s = sub("# wrap model into DDP container\n",
            "import trainguard as tg\n"
            "guard = tg.Guard(model, optimizer, scaler=scaler, clip=(grad_clip or None),\n"
            "                 log=os.path.join(out_dir, 'guard.jsonl'))\n\n"
            "# wrap model into DDP container\n", train)
    s = sub("        scaler.scale(loss).backward()\n",
            "        scaler.scale(loss).backward()\n"
            "        guard.observe_loss(loss.detach() * gradient_accumulation_steps)\n", s)
    s = re.sub(r"    # clip the gradient\n(?:.*\n)*?    scaler\.update\(\)\n", "    guard.step()\n", s,
               count=1)
    if "    guard.step()\n" not in s:
        raise SystemExit("nanogpt_trial: train.py changed; cannot find its clip/scaler block")
    return sub("if ddp:\n    destroy_process_group()", "guard.close()\nif ddp:\n    destroy_process_group()", s)


DOCTOR = """import sys, numpy as np, torch
import trainguard as tg
from model import GPT, GPTConfig
torch.set_num_threads(1)
torch.manual_seed(0)
data = torch.from_numpy(np.fromfile("data/shakespeare_char/train.bin", dtype=np.uint16).astype(np.int64))
with open("data/shakespeare_char/input.txt", encoding="utf-8") as f:
    vocab = len(set(f.read()))  # as nanoGPT's prepare.py counts it
gpt = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128,
                    dropout={dropout}, bias=False))
opt = gpt.configure_optimizers(0.1, {lr}, (0.9, 0.99), "cpu")
gen = torch.Generator().manual_seed(0)
batches = []
for _ in range(8):
    ix = torch.randint(len(data) - 65, (8,), generator=gen)
    batches.append((torch.stack([data[i:i + 64] for i in ix]),
                    torch.stack([data[i + 1:i + 65] for i in ix])))

# nanoGPT's forward(idx, targets) returns (logits, loss): the doctor reads that loss
print(tg.doctor(gpt, None, batches, opt, progress=False))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("nanogpt", help="a checkout of karpathy/nanoGPT")
    ap.add_argument("--text", required=True, help="a plain-text corpus (about 1 MB)")
    ap.add_argument("--iters", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-interval", type=int, default=None, help="default: iters / 4")
    ap.add_argument("--decay-iters", type=int, default=None, help="default: iters")
    ap.add_argument("--compile", action="store_true", help="nanoGPT's compile=True (inductor)")
    ap.add_argument("--only", choices=["bare", "guarded"], default=None)
    ap.add_argument("--src", default=None, help="run another tree's trainguard (its src/)")
    ap.add_argument("--doctor", type=float, default=None, metavar="DROPOUT",
                    help="run trainguard.doctor on the trial's model (this dropout) instead")
    a = ap.parse_args()
    root = os.path.abspath(a.nanogpt)
    data = os.path.join(root, "data", "shakespeare_char")
    with open(a.text, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    with open(os.path.join(data, "input.txt"), "w", encoding="utf-8") as fh:
        fh.write(text)
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    with open(os.path.join(root, "train.py"), encoding="utf-8") as fh:
        train = fh.read()
    with open(os.path.join(root, "train_guarded.py"), "w", encoding="utf-8") as fh:
        fh.write(patch(train))
    out = os.path.join(root, "out-trial")
    os.makedirs(out, exist_ok=True)
    cfg = os.path.join(root, "config", "trial_cpu.py")
    with open(cfg, "w", encoding="utf-8") as fh:
        warmup = min(20, a.iters // 4)
        fh.write(CONFIG.format(out=out, lr=a.lr, min_lr=a.lr / 10, iters=a.iters,
                               eval_interval=a.eval_interval or max(a.iters // 4, 1),
                               decay=max(a.decay_iters or a.iters, warmup + 1), warmup=warmup,
                               compile=a.compile))
    src = a.src or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.doctor is not None:
        with open(os.path.join(root, "doctor_trial.py"), "w", encoding="utf-8") as fh:
            fh.write(DOCTOR.format(dropout=a.doctor, lr=a.lr))
        r = subprocess.run([sys.executable, "doctor_trial.py"], cwd=root, env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"nanogpt_trial: the doctor failed:\n{r.stderr[-3000:]}")
        print(r.stdout[r.stdout.find("trainguard doctor"):].rstrip())
        return
    for name, script in (("bare", "train.py"), ("guarded", "train_guarded.py")):
        if a.only and a.only != name:
            continue
        r = subprocess.run([sys.executable, script, cfg], cwd=root, env=env, capture_output=True,
                           text=True)
        lines = [ln for ln in (r.stdout + r.stderr).splitlines()
                 if ln.startswith(("step ", "trainguard")) or "Error" in ln]
        print(f"== {name} (lr {a.lr:g}, {a.iters} iterations, compile={a.compile})")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
