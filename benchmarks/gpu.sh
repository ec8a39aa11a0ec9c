#!/usr/bin/env bash
# The GPU figures of docs/performance.md, in one go (issue 13, part 4): what a lent GPU machine ran.
#
#   bash benchmarks/gpu.sh DATA_DIR LOG_DIR      # e.g. data/mnist and $OUT on the device machine
#   PART=step bash benchmarks/gpu.sh DATA_DIR LOG_DIR   # only the compiled whole step (issue 26), below
#
# Runs from the repository root with PYTHONPATH=src (no install needed): the CUDA-only tests,
# a 1-GPU torchrun run, the full seed recipe, seeds_throughput.py and the five-seed seed recipe
# trained together. Each step has its own time limit and log, so one that fails leaves the others.
# On an H100 the steps took 20 + 34 + 147 + 33 + 327 s: about 9.5 minutes, within one device call.
# (The fp32 and torch.compile rows of docs/performance.md ran in a second call: docs/results/h100/fp32-and-compile.log.)
set -u
data=${1:?DATA_DIR}
logs=${2:?LOG_DIR}
runs=${RUNS:-/tmp/mnist-cnn-gpu-runs}
dev=${DEVICE:-cuda}    # DEVICE=cpu QUICK="--epochs 1 --train-limit 640" tries this script on a CPU
read -r -a quick <<<"${QUICK:-}"
verify=()              # NO_VERIFY=1: DATA_DIR holds files of another checksum (the test's synthetic digits)
[ -n "${NO_VERIFY:-}" ] && verify=(--no-verify)
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$logs" "$runs"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output in LOG_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"
  tail -n "${TAIL:-6}" "$logs/$name.log"
}

nvidia-smi -L 2>/dev/null || lscpu | grep "Model name"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
if [ "${PART:-all}" = step ]; then  # run.compile = step (training.graph) against the default step: 540 s at most
  step step-throughput 240 python3 benchmarks/train_throughput.py --device "$dev" --repeats 1 --batches "${BATCHES:-300}" \
    --data-dir "$data" --also run.compile=step
  step seed-recipe-step 300 python3 -m mnist_cnn train --device "$dev" --data-dir "$data" --out "$runs/seed-step" \
    --no-progress --set run.compile=step "${verify[@]}" "${quick[@]}"
  exit 0
fi
if [ "$dev" = cpu ]; then  # they skip without CUDA: collecting them would be all this step does
  echo "== cuda-tests: skipped on the CPU"
else
  step cuda-tests 120 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_models.py tests/test_resume.py \
    tests/test_together.py
fi
step torchrun 120 torchrun --nproc-per-node 1 -m mnist_cnn train --epochs 2 --device "$dev" --data-dir "$data" \
  --out "$runs/torchrun" --no-progress "${verify[@]}" "${quick[@]}"
step seed-recipe 240 python3 -m mnist_cnn train --device "$dev" --data-dir "$data" --out "$runs/seed" --no-progress \
  "${verify[@]}" "${quick[@]}"
step seeds-throughput 150 python3 benchmarks/seeds_throughput.py --device "$dev" --seeds 8 --steps "${STEPS:-200}" --data-dir "$data" \
  "${verify[@]}"
TAIL=3 step five-seeds-together 420 python3 -m mnist_cnn train --seeds "${SEEDS:-0-4}" --device "$dev" \
  --data-dir "$data" --out "$runs/five" --no-progress "${verify[@]}" "${quick[@]}"
