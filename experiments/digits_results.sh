#!/usr/bin/env bash
# The README's digits table: FD / IS of 1,000 samples (digits-classifier features) and test NLL
# for DDPM (1000 steps), DDIM (10, 50, 100 steps) and DPM-Solver++(2M) (10, 20 steps), with the
# time of each sampling command.
# Usage: bash experiments/digits_results.sh WORKDIR   (a workdir of configs/ddpm_digits.py)
set -euo pipefail
wd=${1:-runs/digits}
out=experiments/results/digits
mkdir -p "$out"
run() {  # name, sampler, steps
  local start end
  start=$(date +%s.%N)
  python -m diffusion_jax.sample --workdir="$wd" --num_samples=1000 --output="$out/$1.npz" \
    --sampler="$2" --steps="$3" --seed=0
  end=$(date +%s.%N)
  echo "{\"sampler\": \"$2\", \"steps\": $3, \"sample_seconds\": $(echo "$end - $start" | bc)}" \
    > "$out/$1_time.json"
  python -m diffusion_jax.evaluate --workdir="$wd" --metric=fid --samples="$out/$1.npz" > "$out/$1_fid.json"
  python -m diffusion_jax.evaluate --workdir="$wd" --metric=is --samples="$out/$1.npz" > "$out/$1_is.json"
}
run ddim10 ddim 10
run ddim50 ddim 50
run ddim100 ddim 100
run dpm10 dpm_solver++2m 10
run dpm20 dpm_solver++2m 20
run ddpm1000 ddpm 1000
python -m diffusion_jax.evaluate --workdir="$wd" --metric=nll --split=test > "$out/nll_test.json"
tail -n 1 "$out"/*.json
