"""What the network predicts (study 1): eps vs x0 vs v vs the posterior mean mu (with L_simple,
and mu also with the true bound) on the embedded digits, one seed each, scored by FD and class
IS of 1,000 DDIM-50 samples against the digits and by test bits/dim.

`python experiments/parameterization.py [--quick]`: the sweep
experiments/sweeps/parameterization.py (trained and evaluated by diffusion_jax.sweep, finished
points skipped), then experiments/results/parameterization.csv, .md and .png.
"""

from study_common import sweep_study

if __name__ == "__main__":
    sweep_study("parameterization", __doc__)
