#!/usr/bin/env bash
# The `best` and `tiny` studies of docs/guide/tuning.md (issue 14), as one lent GPU ran them: many
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
# STUDIES=vgg (the first call: the VGG-style network) or aug (the second: the new warps on the
# published networks) picks the pair of studies.
set -u
data=${1:?DATA_DIR}
logs=${2:?LOG_DIR}
dev=${DEVICE:-cuda}  # DEVICE=cpu QUICK="--epochs 1 --train-limit 640 --val-size 200" STUDY_S=20 tries it on a CPU
best_workers=${BEST_WORKERS:-8} tiny_workers=${TINY_WORKERS:-6}
study_s=${STUDY_S:-280} kill_s=${KILL_S:-510}
read -r -a quick <<<"${QUICK:-}"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
work=${WORK:-/tmp/mnist-cnn-gpu-tune}
mkdir -p "$logs" "$work"
root=$PWD
cd "$work" || exit 1   # runs/tune/ goes here

common=(--data-dir "$root/$data" --device "$dev" --val-size 10000 --startup-trials 6 --trials 200
        --timeout "$study_s" --no-progress "${quick[@]}")
workers() {  # workers N STUDY RECIPE SPACE MAX_PARAMS [--set ...]: N tune processes on one study
  local n=$1 study=$2 recipe=$3 space=$4 max=$5; shift 5
  for i in $(seq 1 "$n"); do
    timeout -s TERM "$kill_s" python3 -m mnist_cnn tune --recipe "$recipe" --study "$study" \
      --space "$root/$space" --max-params "$max" "${common[@]}" "$@" >"$logs/$study-$i.log" 2>&1 &
  done
}
nvidia-smi -L 2>/dev/null || lscpu | grep "Model name"
case ${STUDIES:-vgg} in
  vgg)   # first call: the VGG-style network, widths searched
    workers "$best_workers" vgg-best best docs/vgg-best-space.toml 16500 --set model=vgg --set augment.zoom_p=0
    workers "$tiny_workers" vgg-tiny tiny docs/vgg-tiny-space.toml 8000 --set model=vgg --set augment.zoom_p=0 ;;
  aug)   # second call: the published networks and recipes with the new warps
    workers "$best_workers" seed-aug best docs/seed-aug-space.toml 16500
    workers "$tiny_workers" tiny-aug tiny docs/tiny-aug-space.toml 8000 ;;
esac
wait
echo "== workers done after $SECONDS s"
grep -h "^study " "$logs"/*-[0-9]*.log
for db in runs/tune/*.db; do
  python3 -m mnist_cnn tune --study "$(basename "$db" .db)" --report 2>&1 | tee "$logs/$(basename "$db" .db)-report.log"
done
# one archive: the lent machine sends back only a few files
tar czf "$logs/tune.tgz" --exclude "trial-*/*.png" runs/tune "$logs"/*.log 2>/dev/null && rm -f "$logs"/*-[0-9]*.log
echo "== all done after $SECONDS s"
