"""Which loss (study 2, the DDPM paper's Table 2 trade-off): L_simple, the true variational
bound L_vlb ("kl", fixed variance beta_t) and improved DDPM's hybrid L_simple + 0.001 L_vlb with
a learned variance, on the embedded digits: sample quality against test bits/dim.

`python experiments/losses.py [--quick]`: the sweep experiments/sweeps/losses.py (trained and
evaluated by diffusion_jax.sweep, finished points skipped), then experiments/results/losses.csv,
.md and .png.
"""

from study_common import sweep_study

if __name__ == "__main__":
    sweep_study("losses", __doc__)
