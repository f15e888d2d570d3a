#!/usr/bin/env bash
# Issue 4's accelerator checks on a lent GPU machine (the `device` tool), whose image has JAX,
# flax, optax and orbax but not ml_collections or grain: carry them as wheels in .whl/ (README,
# "On a GPU"). Runs the named stages (default: all, in this order), each under its own time
# limit so that a slow one leaves the others' results, and writes their logs and JSON to $OUT.
#
#   bash experiments/gpu_run.sh check train_bf16 sample_bf16        # on the GPU machine
#   TRAIN_BATCHES=8 SAMPLE_BATCH=8 SAMPLE_STEPS=2 CONFIG=configs/ddpm_digits.py \
#     OUT=/tmp/out bash experiments/gpu_run.sh                      # a rehearsal on a CPU
#
#   check        experiments/gpu_check.py: the train step's gradient on the GPU vs the CPU
#   train_bf16   bench_train.py with training.mixed_precision (bfloat16 compute)
#   sample_bf16  bench_sample.py, DDPM: forward, and the whole 2 x SAMPLE_STEPS chain
#   train_f32    bench_train.py in float32 (the GPU's default precision: TF32 products)
#
# XLA's GPU autotuning is off (AUTOTUNE=0) unless asked for: with it, JAX 0.11.2 had not
# compiled the CIFAR-10 train step after a 3-minute stage on an H200 (2026-11-30), and a lease
# has 15 minutes.
# Compiled programs are cached in $JAX_COMPILATION_CACHE_DIR, so a rerun on the same machine
# skips the compilations that finished. No FLOP counts (--flops=none): each is one more
# compilation.
set -u
OUT=${OUT:?set OUT to a folder for the logs}
CONFIG=${CONFIG:-configs/ddpm_cifar.py}
TRAIN_BATCHES=${TRAIN_BATCHES:-256}
SAMPLE_BATCH=${SAMPLE_BATCH:-256}
SAMPLE_STEPS=${SAMPLE_STEPS:-500}
STAGES=${*:-check train_bf16 sample_bf16 train_f32}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ! python3 -c "import ml_collections, grain" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/experiments${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_FLAGS="--xla_gpu_autotune_level=${AUTOTUNE:-0}${XLA_FLAGS:+ $XLA_FLAGS}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -e "^[WI][0-9]" -e "^WARNING" "$OUT/$name.log" | tail -n 12
  echo "== $name: rc $rc, $((SECONDS - start)) s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
  echo "XLA_FLAGS=$XLA_FLAGS"
} 2>&1 | tee "$OUT/gpu.txt"

common=(--config="$CONFIG" --flops=none)
bf16=(--set training.mixed_precision=True)
for s in $STAGES; do
  case $s in
    check) stage check 150 python3 experiments/gpu_check.py ;;
    train_bf16) stage train_bf16 200 python3 experiments/bench_train.py "${common[@]}" \
      "${bf16[@]}" --batch-sizes="$TRAIN_BATCHES" --repeats=10 --json="$OUT/train_bf16.json" ;;
    sample_bf16) stage sample_bf16 200 python3 experiments/bench_sample.py "${common[@]}" \
      "${bf16[@]}" --batch-sizes="$SAMPLE_BATCH" --sampler=ddpm --steps="$SAMPLE_STEPS" \
      --repeats=1 --json="$OUT/sample_bf16.json" ;;
    train_f32) stage train_f32 150 python3 experiments/bench_train.py "${common[@]}" \
      --batch-sizes="${TRAIN_BATCHES%%,*}" --repeats=10 --json="$OUT/train_f32.json" ;;
    *) echo "unknown stage $s" && exit 2 ;;
  esac
done
