"""Noise schedules at equal training budget (study 6): linear, cosine and quadratic on the
embedded digits, and a linear schedule ending at beta_T = 0.005, whose alpha_bar_T = 0.08 is far
from 0 (the notes: the forward process must end close to N(0, I), since sampling starts there).

`python experiments/schedules.py [--quick]`: the sweep experiments/sweeps/schedules.py (trained and
evaluated by diffusion_jax.sweep, finished points skipped), then experiments/results/schedules.csv,
.md and .png.
"""

from study_common import sweep_study

if __name__ == "__main__":
    sweep_study("schedules", __doc__)
