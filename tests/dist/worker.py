"""Run under torchrun --nproc_per_node=2 (gloo, CPU). Usage: worker.py MODE OUT_DIR

MODE: ddp | ddp_nosync | fsdp. A NaN is planted in rank 1's batch at step 20 and one parameter of rank 1 is
set to Inf at step 45: every rank must take the same decisions at the same steps (skip, then
rollback) and the replicas must stay identical. Each rank writes its record as JSON.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import trainguard as tg


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    if mode in ("ddp", "ddp_nosync"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(net)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(net)
        model = net
    else:
        raise SystemExit(f"unknown mode {mode}")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = tg.Guard(model, opt, console=False, snapshot_every=10, sync=mode != "ddp_nosync")
    gen = torch.Generator().manual_seed(100 + rank)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(7))
    losses = []
    for t in range(60):
        x = torch.randn(64, 8, generator=gen)
        y = x @ w
        if t == 20 and rank == 1:
            x[0, 0] = float("nan")
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if t == 45 and rank == 1:
            with torch.no_grad():
                p = next(iter(model.parameters()))
                loc = p._local_tensor if hasattr(p, "_local_tensor") else p
                loc.view(-1)[0] = float("inf")
        guard.step(loss)
        losses.append(loss.item())
    guard.close()
    flat = []
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        flat.append(t.reshape(-1))
    params = torch.cat(flat)
    gathered = [torch.zeros_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    record = {
        "rank": rank,
        "findings": [(f.kind, f.step, f.origin) for f in guard.findings],
        "actions": [(a.kind, a.step) for a in guard.actions],
        "replicas_equal": all(torch.equal(gathered[0], g) for g in gathered),
        "finite": bool(torch.isfinite(params).all()),
        "final_loss": sum(losses[-5:]) / 5,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)
    dist.barrier()
    # gloo's teardown sometimes aborts at interpreter exit ("terminate called without an
    # active exception"), unrelated to training: leave without running it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
