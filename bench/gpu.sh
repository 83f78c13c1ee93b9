#!/usr/bin/env bash
# Every GPU check in one short run (issue #15): the suite's CUDA tests (zero host syncs for
# Guard(sync=False) included), the zoo's precision scenarios with real fp16/bf16 kernels, and
# the overhead benchmark on a ~100M-parameter GPT under bf16 autocast against bare,
# clip_grad_norm_, ZClip and detect_anomaly, and each variant's peak device memory.
#
#   bash bench/gpu.sh            # writes its logs and JSON under $OUT (default out/gpu)
#
# Needs a CUDA machine with torch, pytest, numpy, scikit-learn and rich; ZClip is picked up
# from .gpu/site when carried there (pure Python). About 6 minutes on one H100/H200.
set -u
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

echo "== 1. CUDA tests"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_deferred.py tests/test_snapshot.py \
  tests/test_lightning.py tests/test_guarded_optimizer.py tests/test_transformers.py -rs 2>&1 | tail -40 | tee "$OUT/tests.txt"

echo "== 2. zoo precision scenarios on CUDA (real fp16/bf16 kernels)"
timeout 150 $PY -m trainguard.cli zoo --only precision_ data_nan_input healthy_mlp_regressor healthy_cnn \
  healthy_char_transformer --device cuda --no-baselines \
  --json "$OUT/zoo_cuda.json" 2>&1 | tee "$OUT/zoo.txt"

echo "== 3. overhead on a ~100M-parameter GPT, bf16 autocast"
timeout 200 $PY bench/overhead_gpu.py --memory --json "$OUT/overhead_gpu.json" 2>&1 | tee "$OUT/overhead.txt"

echo "== 4. the rest of the suite (torch on the GPU machine), as time allows"
timeout 90 $PY -m pytest -q -x -p no:cacheprovider -n 8 tests/test_guard.py tests/test_nothing_lost.py \
  tests/test_guard_dtypes.py tests/test_guard_input.py tests/test_locate.py tests/test_checkpoints.py \
  tests/test_functional_activations.py 2>&1 | tail -15 | tee "$OUT/suite.txt"
