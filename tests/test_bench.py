"""The benchmark scripts behind the README's figures still run (tiny settings; no timing is
asserted, only that they finish and print what the docs quote)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_overhead_runs_on_each_model_with_blocks_shorter_than_the_warm_up():
    # a block of fewer than 10 steps used to crash the warm-up (it indexed 10 batches)
    out = run("bench/overhead.py", "--model", "mlp", "--width", "16", "--batch", "4",
              "--only", "guard", "clip_grad_norm_", "--rounds", "1", "--block", "3")
    assert "clip_grad_norm_" in out and "guard" in out
    out = run("bench/overhead.py", "--model", "gpt", "--width", "64", "--batch", "2",
              "--only", "guard", "--rounds", "1", "--block", "2")
    assert "GPT 2x64" in out


def test_detector_cost_compares_a_tree_with_itself():
    out = run("bench/detector_cost.py", "--rounds", "1", "--patterns", "6",
              "--compare", os.path.join(ROOT, "src"))
    assert "identical findings and final states: True" in out
    assert "DivergenceDetector" in out


def test_gpu_overhead_script_smoke_runs_on_cpu_with_its_breakdown_variants():
    # the script bench/gpu.sh runs on a GPU machine: its options must work before one is lent
    out = run("bench/overhead_gpu.py", "--device", "cpu", "--layers", "1", "--width", "64",
              "--vocab", "256", "--ctx", "16", "--batch", "2", "--rounds", "1", "--block", "2",
              "--only", "guard", "guard detectors=[], locate=False", "--memory",
              "--src", os.path.join(ROOT, "src"))
    assert "guard detectors=[], locate=False" in out and "sampled probe step" in out


def test_compile_recompiles_and_sampled_step_scripts_run():
    out = run("bench/compile_recompiles.py", "--steps", "12", "--src", os.path.join(ROOT, "src"))
    assert out.count("graphs compiled:") == 4
    out = run("bench/sampled_step.py", "--model", "gpt", "--rounds", "1")
    assert "its pieces (median ms)" in out


def test_host_time_runs_alone_with_rules_and_compares_a_tree_with_itself():
    out = run("bench/host_time.py", "--rounds", "2", "--block", "30", "--rules",
              "--model", "small")
    assert "plain" in out and "clip_grad_norm_ call" in out and "Divergence" in out
    out = run("bench/host_time.py", "--rounds", "1", "--block", "12", "--runs", "1",
              "--compare", os.path.join(ROOT, "src"))
    assert "guard amortised" in out and "gradient read" in out
    for model, says in (("frozen", "first layer frozen"), ("experts", "expert heads")):
        out = run("bench/host_time.py", "--rounds", "1", "--block", "12", "--model", model)
        assert says in out and "clip_grad_norm_ call" in out
    out = run("bench/overhead.py", "--model", "mlp", "--width", "16", "--batch", "4",
              "--only", "grad read", "--rounds", "1", "--block", "3")
    assert "grad read" in out


_MINI_TRAIN = '''import argparse
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim

if __name__ == '__main__':
    parser = argparse.ArgumentParser()
    parser.add_argument('--steps', type=int, default=15)
    opt = parser.parse_args()
    torch.manual_seed(0)
    data = torch.load('traindata.pt')
    input = torch.from_numpy(data[:, :-1])
    target = torch.from_numpy(data[:, 1:])
    seq = nn.Linear(9, 9).double()
    criterion = nn.MSELoss()
    optimizer = optim.LBFGS(seq.parameters(), lr=0.8)
    for i in range(opt.steps):
        def closure():
            optimizer.zero_grad()
            loss = criterion(seq(input), target)
            print('loss:', loss.item())
            loss.backward()
            return loss
        optimizer.step(closure)
        with torch.no_grad():
            print('test loss:', criterion(seq(input), target).item())
'''


def test_lbfgs_trial_runs_on_a_miniature_of_the_example(tmp_path):
    """bench/lbfgs_trial.py on a stand-in with the example's lines (the real one needs a
    pytorch/examples checkout and minutes)."""
    (tmp_path / "train.py").write_text(_MINI_TRAIN)
    (tmp_path / "generate_sine_wave.py").write_text(
        "import numpy as np\nimport torch\nnp.random.seed(2)\n"
        "torch.save(np.sin(np.arange(40.0)).reshape(4, 10), open('traindata.pt', 'wb'))\n")
    out = run("bench/lbfgs_trial.py", str(tmp_path), "--steps", "2")
    assert "printed losses identical: True" in out and "trainguard summary: 2 steps" in out


def test_periodic_cost_runs_alone_and_compares_a_tree_with_itself():
    out = run("bench/periodic_cost.py", "--repeat", "1")
    assert "cadence measurement" in out and "snapshot take" in out
    out = run("bench/periodic_cost.py", "--repeat", "1", "--runs", "1",
              "--compare", os.path.join(ROOT, "src"))
    assert "1,000 tensors (499 x Linear(16,16)+Tanh), snapshot verify" in out


def test_step_pieces_times_each_piece_in_the_loop_and_the_alternatives():
    out = run("bench/step_pieces.py", "--steps", "20", "--warmup", "3")
    for piece in ("the read", "DivergenceDetector", "locate hook", "the optimizer's update",
                  "capture: forward hook", "unguarded forward", "an empty wrapped call"):
        assert piece in out, piece
    out = run("bench/step_pieces.py", "--alternatives")
    assert "retain_grad()" in out and "torch.dot per tensor" in out


def test_sample_ids_cost_runs():
    out = run("bench/sample_ids.py", "--steps", "60", "--warmup", "6")
    assert "+ sample_ids, sample_losses" in out


def test_muon_trial_runs():
    out = run("bench/muon_trial.py", "--steps", "3", "--burst-steps", "3", "--width", "32",
              "--layers", "1")
    assert "guarded, both LRs x30" in out


def test_loss_goals_trial_runs():
    out = run("bench/loss_goals.py", "--seeds", "1", "--steps", "30")
    assert "gan seed 0 judge_loss=auto" in out and "reinforce seed 0 judge_loss=False" in out


def test_zoo_compare_names_the_records_and_scores_that_changed(tmp_path):
    import json
    rec = {"scenario": "s", "seed": 0, "findings": ["plateau"], "finding_steps": [51],
           "seconds_guarded": 1.0}
    before, after = tmp_path / "a.json", tmp_path / "b.json"
    before.write_text(json.dumps([rec, dict(rec, seed=1)]))
    after.write_text(json.dumps([dict(rec, seconds_guarded=2.0),
                                 dict(rec, seed=1, finding_steps=[60])]))
    (tmp_path / "a.totals.json").write_text(json.dumps([{"detection_recall": 1.0}]))
    (tmp_path / "b.totals.json").write_text(json.dumps([{"detection_recall": 1.0}]))
    out = run("bench/zoo_compare.py", str(before), str(after))
    assert "s seed 1:\n    finding_steps: [51] -> [60]" in out and "s seed 0" not in out
    assert "1 differ" in out and "scores: unchanged" in out


def test_metric_learning_trial_runs():
    out = run("bench/metric_learning_trial.py", "--steps", "40", "--temps", "0.5")
    assert out.count("losses of the bare and the guarded run identical") == 2, out


def test_diffusion_trial_runs():
    out = run("bench/diffusion_trial.py", "--steps", "30", "--seeds", "0", "--lrs", "1e-3",
              "--data", "roll")
    assert "roll lr 0.001 seed 0: identical True" in out, out
    out = run("bench/diffusion_trial.py", "--observe", "--steps", "30", "--seeds", "0",
              "--lrs", "1e-3", "--data", "roll")
    assert "(bare, observed)" in out, out
    out = run("bench/diffusion_trial.py", "--doctor", "--steps", "30", "--seeds", "1",
              "--lrs", "3e-2", "--data", "digits")
    assert "suggested lr 0.01, warmup 2000" in out, out
    assert "[warning] lr_too_high" in out, out


def test_small_batch_runs():
    out = run("bench/small_batch.py", "--steps", "60", "--seeds", "0", "--batches", "1")
    assert out.count("bit for bit bare") == 3, out
    assert "3 runs of 60 steps: the Guard acted on 0, halted 0" in out, out
