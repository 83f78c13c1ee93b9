"""DDP and FSDP2 under torchrun --nproc_per_node=2 on gloo (CPU): every rank takes the same
decision at the same step, replicas stay identical, nothing hangs."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "dist" / "worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["ddp", "ddp_nosync", "fsdp"])
def test_all_ranks_decide_together(mode, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), mode, str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if proc.returncode != 0:
        (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if not l.startswith("W"))[-4000:]
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in recs:
        assert r["replicas_equal"] and r["finite"]
        assert ["nonfinite", 20] == r["findings"][0][:2]
        assert ("skip", 20) in map(tuple, r["actions"])
        assert any(a[0] == "rollback" for a in r["actions"])
        assert r["final_loss"] < 0.5
    assert recs[0]["findings"] == recs[1]["findings"]
    assert recs[0]["actions"] == recs[1]["actions"]
