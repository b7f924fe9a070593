#!/usr/bin/env bash
# Produces the GPU figures in docs/results.md: the benchmark on CUDA, then 50-epoch runs (fcn16 four ways, fcn32) on a
# SYNTHETIC tree of KITTI's size (200 labelled images at KITTI resolutions), random init (no internet there).
# bench.py needs onnxruntime and export.py onnxscript/onnx (requirements*.txt): carry the wheels if the machine lacks them.
# Usage: bash scripts/gpu_results.sh OUT_DIR [STAGE ...]   stages: check (GPU-only tests, bench: ~4 min on an H100),
# runs (three 50-epoch runs: ~4 min), suite (the whole test suite), camvid (issue 32's rows, each scored on test:
# first what the CPU left open, a second seed of 50 full-scale epochs with log weights and 90 full-scale epochs on
# the held-out-drive split; then the 50- and 60-epoch rows the CPU measured (60: the final fit on train+val); then
# the one-command recipe, 50 half-scale then 40 full-scale epochs with --stages, three seeds, the same on the
# held-out split and as a final fit, at ENet's length, 300 epochs in all; then
# docs/results.md's older CamVid rows still to run). Default: check runs. A device call may last at most 10 minutes,
# so give each call one stage; CAMVID_ROWS="name ..." runs only those camvid rows.
# camvid needs data/camvid (182 MB, with its splits-heldout/ and splits-trainval/) from scripts/prepare_camvid.py on
# the device, more than one call carries (64 MiB): here `tar -cf - data/camvid | split -b 60M - data/camvid.tar.part-`,
# one call per part with carry ["data/camvid.tar.part-aa"] and so on (a warm machine keeps them), then this stage
# puts them together.
set -euo pipefail
out=${1:?usage: gpu_results.sh OUT_DIR [check] [runs] [suite] [camvid]}
shift
stages=" ${*:-check runs} "
for stage in $stages; do
  case $stage in check|runs|suite|camvid) ;; *) echo "unknown stage '$stage': use check, runs, suite or camvid" >&2; exit 2 ;; esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
has_stage() { [[ $stages == *" $1 "* ]]; }

check() {
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/bench_cuda.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/bench_cuda.txt"
# first, as it has never run on a GPU: the test that only a GPU runs (skipped elsewhere), CUDA kill-and-resume
# bit-identity with --deterministic (about a minute)
# and test.py reproducing the run's own val mIoU under bf16 autocast (issue 26)
OMP_NUM_THREADS=4 python3 -m pytest -q -p no:cacheprovider tests/test_determinism.py \
  "tests/test_agreement.py::test_test_py_on_best_pt_reproduces_the_runs_validation_exactly" > "$out/pytest_gpu.txt" 2>&1 || true
tail -15 "$out/pytest_gpu.txt"
python3 bench.py --device cuda --cityscapes --json "$out/bench_cuda.json" | tee -a "$out/bench_cuda.txt" \
  || echo "bench FAILED" | tee -a "$out/bench_cuda.txt"
}

runs() {
python3 data_preprocessing.py --make-synthetic /tmp/kitti-synthetic --num 200 --num-test 8
# 50-epoch runs: fcn16 and fcn32 with the defaults, then fcn16 with --deterministic (its cost). Each took 72-92 s
# on an H100 before issue 13's changes.
run() {  # name, flags...
  local name=$1; shift
  local start=$SECONDS
  python3 main.py --no-pretrained --data-root /tmp/kitti-synthetic --out "/tmp/runs/$name" --workers "${WORKERS:-8}" "$@" \
    | tee "$out/train_$name.log" || return
  echo "wall seconds $name: $((SECONDS - start))" | tee -a "$out/train_$name.log"
  cp "/tmp/runs/$name/metrics.csv" "$out/metrics_$name.csv"
}
run fcn16 --arch fcn16
run fcn32 --arch fcn32
python3 test.py --checkpoint /tmp/runs/fcn16/best.pt --num-visuals 2 | tail -4 | tee -a "$out/train_fcn16.log"
cp /tmp/runs/fcn16/curves.png "$out/curves_fcn16.png"
cp "$(ls /tmp/runs/fcn16/test_val/overlay/*.png | head -1)" "$out/overlay_fcn16.png"
# not yet run on a GPU: a failure is recorded and the script goes on
run fcn16_deterministic --arch fcn16 --deterministic || echo "fcn16_deterministic FAILED" | tee -a "$out/train_fcn16_deterministic.log"
}

suite() {  # the whole suite, in parallel where pytest-xdist is installed (threads kept low so tests do not starve);
  # failures are read from pytest_suite.txt, not from this script's status, so that the other stages still run
  local parallel=""
  python3 -c "import xdist" 2>/dev/null && parallel="-n 4"
  OMP_NUM_THREADS=2 python3 -m pytest -q -p no:cacheprovider $parallel > "$out/pytest_suite.txt" 2>&1 || true
  tail -25 "$out/pytest_suite.txt"
}

camvid() {  # the commands of docs/results.md's CamVid rows, on the GPU
  [[ -d data/camvid ]] || cat data/camvid.tar.part-* | tar -xf -
  local camvid="--no-pretrained --arch fcn8 --data-root data/camvid --label-set data/camvid/camvid.csv"
  local log320="--class-weights log --crop-size 320 --base-size 360"  # ENet's weights, the staged recipe's sizes
  local recipe="$log320 --epochs 90 --stages 0.5:50"
  local name run_flags start
  while read -r name run_flags; do
    [[ -z ${CAMVID_ROWS:-} || " $CAMVID_ROWS " == *" $name "* ]] || continue
    run_flags=${run_flags//RECIPE/$recipe}
    run_flags=${run_flags//LOG320/$log320}
    start=$SECONDS
    python3 main.py $camvid $run_flags --workers "${WORKERS:-8}" --out "/tmp/camvid/$name" < /dev/null \
      > "$out/camvid_$name.log" 2>&1 || { echo "camvid $name FAILED" | tee -a "$out/camvid_$name.log"; continue; }
    echo "wall seconds $name: $((SECONDS - start))" | tee -a "$out/camvid_$name.log"
    python3 test.py --checkpoint "/tmp/camvid/$name/best.pt" --split test --out "/tmp/camvid/$name-test" < /dev/null \
      | tail -20 >> "$out/camvid_$name.log"
    cp "/tmp/camvid/$name/metrics.csv" "$out/camvid_metrics_$name.csv"
    cp "/tmp/camvid/$name-test/metrics.json" "$out/camvid_test_$name.json"
  done <<'ROWS'
budget50-full-seed1 LOG320 --epochs 50 --split-dir data/camvid/splits-heldout --seed 1
full90-heldout-seed0 LOG320 --epochs 90 --split-dir data/camvid/splits-heldout --seed 0
full90-heldout-seed1 LOG320 --epochs 90 --split-dir data/camvid/splits-heldout --seed 1
budget50-full-seed0 LOG320 --epochs 50 --split-dir data/camvid/splits-heldout --seed 0
budget50-stages-seed0 LOG320 --epochs 50 --stages 0.5:30 --split-dir data/camvid/splits-heldout --seed 0
budget50-stages-seed1 LOG320 --epochs 50 --stages 0.5:30 --split-dir data/camvid/splits-heldout --seed 1
trainval60-full-seed0 LOG320 --epochs 60 --split-dir data/camvid/splits-trainval --seed 0
trainval60-full-seed1 LOG320 --epochs 60 --split-dir data/camvid/splits-trainval --seed 1
trainval60-full-seed2 LOG320 --epochs 60 --split-dir data/camvid/splits-trainval --seed 2
stages-seed0 RECIPE --split-dir data/camvid/splits --seed 0
stages-seed1 RECIPE --split-dir data/camvid/splits --seed 1
stages-seed2 RECIPE --split-dir data/camvid/splits --seed 2
heldout-seed0 RECIPE --split-dir data/camvid/splits-heldout --seed 0
heldout-seed1 RECIPE --split-dir data/camvid/splits-heldout --seed 1
trainval-seed0 RECIPE --split-dir data/camvid/splits-trainval --seed 0
trainval-seed1 RECIPE --split-dir data/camvid/splits-trainval --seed 1
stages-300-seed0 RECIPE --split-dir data/camvid/splits --epochs 300 --stages 0.5:250 --seed 0
fcn32 --split-dir data/camvid/splits --arch fcn32
fcn8-mf-seed1 --split-dir data/camvid/splits --class-weights median-freq --seed 1
fcn8-mf-seed2 --split-dir data/camvid/splits --class-weights median-freq --seed 2
ROWS
}

for stage in check runs suite camvid; do
  if has_stage $stage; then $stage; fi
done
