"""What the photo-patch sweeps share: the smoke-run settings of --quick."""

# A one-level UNet trained 8 steps on a 200-step schedule whose levels still reach
# alpha_bar ~ 1e-9 (beta to 0.2), so the shorter sampling schedules stay in the trained range.
QUICK = {
    "config": {
        "model.ch_mult": (1,),
        "model.num_res_blocks": 1,
        "model.attn_resolutions": (),
        "model.kernels": "xla",  # plain Flax compiles faster; the CPU kernels pay off in long runs
        "diffusion.num_timesteps": 200,
        "diffusion.beta_end": 0.2,
        "training.batch_size": 8,  # 32x32 colour patches: the steps themselves cost here
        "training.num_train_steps": 8,
        "training.checkpoint_every": 8,
    },
}
