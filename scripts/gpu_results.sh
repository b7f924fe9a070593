#!/usr/bin/env bash
# Produces the GPU figures in docs/results.md: the benchmark on CUDA, then 50 epochs of fcn32 and fcn16 on a
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
for arch in fcn32 fcn16; do
  start=$SECONDS
  python3 main.py --arch "$arch" --no-pretrained --data-root /tmp/kitti-synthetic --out "/tmp/runs/$arch" \
    --workers "${WORKERS:-8}" | tee "$out/train_$arch.log"
  echo "wall seconds $arch: $((SECONDS - start))" | tee -a "$out/train_$arch.log"
  cp "/tmp/runs/$arch/metrics.csv" "$out/metrics_$arch.csv"
done
python3 test.py --checkpoint /tmp/runs/fcn16/best.pt --num-visuals 2 | tail -4 | tee -a "$out/train_fcn16.log"
cp /tmp/runs/fcn16/curves.png "$out/curves_fcn16.png"
cp "$(ls /tmp/runs/fcn16/test_val/overlay/*.png | head -1)" "$out/overlay_fcn16.png"
