"""One rank of a Hugging Face Trainer run under torchrun (gloo, CPU): a 1-layer GPT-2 whose
forward takes ``num_items_in_batch`` (the Trainer then divides each micro-batch's summed loss by
the token count of every rank's micro-batches and multiplies it by the number of processes),
ragged label lengths so that the ranks count different numbers of tokens, accumulation
``argv[2]``. Writes the Trainer's logged losses and the Guard's to ``argv[1]/rank<r>.json``."""
import json
import os
import sys
import warnings

import torch
import transformers

from trainguard.integrations.transformers import GuardCallback

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
out, gas = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=256, n_positions=32)
g = torch.Generator().manual_seed(0)
data = []
for i in range(256):
    ids = torch.randint(0, 256, (32,), generator=g)
    labels = ids.clone()
    labels[8 + (i * 7) % 24:] = -100
    data.append({"input_ids": ids, "labels": labels})
cb = GuardCallback(console=False)
args = transformers.TrainingArguments(
    output_dir=os.path.join(out, "trainer"), max_steps=6, per_device_train_batch_size=4,
    gradient_accumulation_steps=gas, learning_rate=1e-3, report_to=[], logging_steps=1,
    save_strategy="no", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, ddp_backend="gloo")
trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args,
                               train_dataset=data, callbacks=[cb])
trainer.train()
assert cb.guard is not None
with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
    json.dump({"world": args.world_size, "average": args.average_tokens_across_devices,
               "logged": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "guard": [s.loss for s in cb.guard.history], "chance": cb.guard.core.chance_loss,
               "findings": [f.kind for f in cb.guard.findings]}, fh)
torch.distributed.barrier()
# gloo's teardown sometimes aborts at interpreter exit ("terminate called without an active
# exception"), unrelated to training (tests/dist/worker.py): leave without running it
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
