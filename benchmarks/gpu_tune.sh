#!/usr/bin/env bash
# The `best` and `tiny` studies of README's "Tuning" (issue 14), as one lent GPU ran them: many
# `mnist-cnn tune` workers at once on one GPU, two studies side by side, each study on its own
# SQLite file. A batch of 64 leaves an H100 mostly idle (each step is launch-bound, ~5 ms), so
# workers sharing it finish more trials per minute than one worker.
#
#   bash benchmarks/gpu_tune.sh DATA_DIR LOG_DIR     # e.g. data/mnist and $OUT on the device machine
#
# Every worker stops starting trials after STUDY_S seconds and is stopped (SIGTERM: its running
# trial is marked failed, the study stays consistent) at KILL_S; then each study's --report writes
# the best trials, importances, plots and best.toml. LOG_DIR gets the logs, the study databases and
# the trial folders (config.toml, metrics.csv, last.pt), so the report can be re-run elsewhere.
set -u
data=${1:?DATA_DIR}
logs=${2:?LOG_DIR}
dev=${DEVICE:-cuda}            # DEVICE=cpu QUICK="--epochs 1 --train-limit 640" tries this on a CPU
best_workers=${BEST_WORKERS:-8} tiny_workers=${TINY_WORKERS:-6}
study_s=${STUDY_S:-280} kill_s=${KILL_S:-510}
read -r -a quick <<<"${QUICK:-}"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
work=${WORK:-/tmp/mnist-cnn-gpu-tune}
mkdir -p "$logs" "$work"
root=$PWD
cd "$work" || exit 1   # runs/tune/ goes here

common=(--data-dir "$root/$data" --device "$dev" --val-size 10000 --startup-trials 6 --trials 200
        --timeout "$study_s" --no-progress --set model=vgg --set augment.zoom_p=0 "${quick[@]}")
nvidia-smi -L 2>/dev/null || lscpu | grep "Model name"
for i in $(seq 1 "$best_workers"); do
  timeout -s TERM "$kill_s" python3 -m mnist_cnn tune --recipe best --study vgg-best \
    --space "$root/docs/vgg-best-space.toml" --max-params 16500 "${common[@]}" >"$logs/best-$i.log" 2>&1 &
done
for i in $(seq 1 "$tiny_workers"); do
  timeout -s TERM "$kill_s" python3 -m mnist_cnn tune --recipe tiny --study vgg-tiny \
    --space "$root/docs/vgg-tiny-space.toml" --max-params 8000 "${common[@]}" >"$logs/tiny-$i.log" 2>&1 &
done
wait
echo "== workers done after $SECONDS s"
grep -h "^study " "$logs"/*-[0-9]*.log
for study in vgg-best vgg-tiny; do
  python3 -m mnist_cnn tune --study "$study" --report 2>&1 | tee "$logs/$study-report.log"
done
cp -r runs/tune "$logs/" 2>/dev/null
find "$logs/tune" -name "*.png" -path "*/trial-*" -delete  # each trial's curves: not needed to re-report
echo "== all done after $SECONDS s"
