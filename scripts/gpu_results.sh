#!/usr/bin/env bash
# Produces the GPU figures in docs/results.md: the benchmark on CUDA, then 50-epoch runs (fcn16 four ways, fcn32) on a
# SYNTHETIC tree of KITTI's size (200 labelled images at KITTI resolutions), random init (no internet there).
# bench.py needs onnxruntime and export.py onnxscript/onnx (requirements*.txt): carry the wheels if the machine lacks them.
# Usage: bash scripts/gpu_results.sh OUT_DIR
set -euo pipefail
out=${1:?usage: gpu_results.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/bench_cuda.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/bench_cuda.txt"
python3 bench.py --device cuda --cityscapes --json "$out/bench_cuda.json" | tee -a "$out/bench_cuda.txt"
python3 data_preprocessing.py --make-synthetic /tmp/kitti-synthetic --num 200 --num-test 8
# issue 13: the same 50-epoch fcn16 run with augmentation in the loader workers (the default), on the device
# (--augment-on device), with --compile, and with --deterministic (its cost); then fcn32 with the defaults.
run() {  # name, flags...
  local name=$1; shift
  local start=$SECONDS
  python3 main.py --no-pretrained --data-root /tmp/kitti-synthetic --out "/tmp/runs/$name" --workers "${WORKERS:-8}" "$@" \
    | tee "$out/train_$name.log"
  echo "wall seconds $name: $((SECONDS - start))" | tee -a "$out/train_$name.log"
  cp "/tmp/runs/$name/metrics.csv" "$out/metrics_$name.csv"
}
run fcn16 --arch fcn16
run fcn16_device --arch fcn16 --augment-on device
run fcn16_compile --arch fcn16 --compile
run fcn16_deterministic --arch fcn16 --deterministic
run fcn32 --arch fcn32
# the tests that only a GPU runs (skipped elsewhere): CUDA kill-and-resume bit-identity, resident batches on CUDA
OMP_NUM_THREADS=4 python3 -m pytest -q -p no:cacheprovider tests/test_determinism.py tests/test_resident_batches.py \
  2>&1 | tail -15 | tee "$out/pytest_gpu.txt"
python3 test.py --checkpoint /tmp/runs/fcn16/best.pt --num-visuals 2 | tail -4 | tee -a "$out/train_fcn16.log"
cp /tmp/runs/fcn16/curves.png "$out/curves_fcn16.png"
cp "$(ls /tmp/runs/fcn16/test_val/overlay/*.png | head -1)" "$out/overlay_fcn16.png"
