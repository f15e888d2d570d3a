# The commands behind docs/results.md's classifier-guidance table (run from the repo root): a
# noisy digits classifier guides the unconditional digits model of configs/ddpm_digits.py
# (trained in $1) towards classes cycled 0..9.
set -e
D=${1:-runs/ddpm_digits}
C=${2:-runs/classifier_digits}
python -m diffusion_jax.train --config=configs/classifier_digits.py --workdir=$C
for s in 0 1 3 5; do
  /usr/bin/time -f "sample scale=$s %e s" python -m diffusion_jax.sample --workdir=$D \
    --num_samples=1000 --output=$C/guided_s$s.npz --classifier_workdir=$C --classifier_scale=$s | tail -1
  python -m diffusion_jax.evaluate --workdir=$C --metric=class_accuracy --samples=$C/guided_s$s.npz | tail -1
  python -m diffusion_jax.evaluate --workdir=$D --metric=fid --samples=$C/guided_s$s.npz 2>&1 | tail -1
done
