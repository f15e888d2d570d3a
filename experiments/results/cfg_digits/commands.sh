# The commands behind docs/results.md's classifier-free guidance table (run from the repo root).
set -e
W=${1:-runs/cfg_digits}
python -m diffusion_jax.train --config=configs/cfg_digits.py --workdir=$W
for g in 0 1 2 3 5; do
  /usr/bin/time -f "sample g=$g %e s" python -m diffusion_jax.sample --workdir=$W --num_samples=1000 --output=$W/samples_g$g.npz --guidance=$g | tail -1
  python -m diffusion_jax.evaluate --workdir=$W --metric=class_accuracy --samples=$W/samples_g$g.npz | tail -1
  python -m diffusion_jax.evaluate --workdir=$W --metric=fid --samples=$W/samples_g$g.npz 2>&1 | tail -1
done
