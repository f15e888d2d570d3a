"""What the digits sweeps share: their evaluations, and the smoke-run settings of --quick."""

# FD and class IS of 1,000 samples (the config's sampler: DDIM, 50 steps) against the training
# digits in the digits classifier's features; bits/dim of the 300 test digits (the full bound).
EVALUATE = [
    {"metric": "fid,is", "num_samples": 1000},  # one sampling, a column each
    {"metric": "nll", "num_samples": 300, "name": "test_bpd"},
]

# A one-level UNet, T = 100, 8 steps, 100 samples (and test digits for the bound, in one batch):
# each point compiles and runs in seconds.
QUICK = {
    "config": {
        "model.ch_mult": (1,),
        "model.attn_resolutions": (),
        "model.kernels": "xla",  # plain Flax compiles faster; the CPU kernels pay off in long runs
        "diffusion.num_timesteps": 100,
        "sampling.steps": 10,
        "training.num_train_steps": 8,
        "training.sample_every": 0,
    },
    "evaluate": {"num_samples": 100, "batch_size": 100},
}
