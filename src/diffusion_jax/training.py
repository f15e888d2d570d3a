"""The train state and the jitted train step; no CLI, no file paths.

One step on a global batch: the loss of the OBJECTIVES entry config.training.objective (a
denoiser's `diffusion.training_losses` at uniform t, or a noisy classifier's cross-entropy), an
optimizer of the OPTIMIZERS table (Adam, AdamW) with a learning rate of the LR_SCHEDULES table
after clipping the gradients' global norm, EMA of the parameters. A step whose loss or
gradients are not finite leaves the state unchanged and is counted, so a state never holds NaNs;
the loop decides (nan_policy) whether to stop or go on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from ml_collections import config_dict

from diffusion_jax import classifier_guidance, degradations, diffusion, schedules
from diffusion_jax.data import to_model_range
from diffusion_jax.models.refiner import Refiner, predict


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    nonfinite_steps: jax.Array  # int32 scalar: updates skipped for a NaN/inf loss or gradient
    first_nonfinite_step: jax.Array  # int32 scalar: first such step, as logged (1-based); -1: none


def model_config(config) -> config_dict.ConfigDict:
    """config.model completed with what follows from the data and the diffusion settings."""
    cfg = config_dict.ConfigDict(config.model.to_dict())
    cfg.image_size = config.data.image_size
    cfg.in_channels = config.data.num_channels
    cfg.update(objective(config).model_fields(config))
    if config.training.get("mixed_precision", False):
        cfg.dtype = "bfloat16"
    return cfg


def make_schedule(config) -> schedules.Schedule:
    """The training schedule: config.diffusion's name, num_timesteps and beta range."""
    return schedules.training_schedule(config)


# Learning-rate schedules: name -> (optim config, num_train_steps) -> schedule(count), where
# count is the number of updates applied before this one (optax's own count, which a skipped
# non-finite step does not advance). Update k = count + 1 (1-based) warms up linearly over
# warmup_steps: lr * k / warmup_steps until k = warmup_steps; warmup_steps = 0 means the full lr
# from the first update.


def _warmup(count, warmup_steps: int):
    return jnp.minimum(1.0, (count + 1) / warmup_steps) if warmup_steps else 1.0


def constant_lr(optim, num_train_steps: int) -> optax.Schedule:
    """Warmup, then optim.lr (DDPM)."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    return lambda count: lr * _warmup(count, warmup)


def cosine_lr(optim, num_train_steps: int) -> optax.Schedule:
    """Warmup, then a cosine from optim.lr (update warmup_steps + 1) towards 0 (at update
    num_train_steps + 1, never taken)."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    decay_steps = max(num_train_steps - warmup, 1)

    def schedule(count):
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return lr * jnp.where(count < warmup, _warmup(count, warmup), cosine)

    return schedule


LR_SCHEDULES = {"constant": constant_lr, "cosine": cosine_lr}


def _adam_kwargs(optim) -> dict:
    return dict(b1=optim.beta1, b2=optim.beta2, eps=optim.eps)


def adam(lr: optax.Schedule, optim) -> optax.GradientTransformation:
    return optax.adam(lr, **_adam_kwargs(optim))


def adamw(lr: optax.Schedule, optim) -> optax.GradientTransformation:
    """Adam with decoupled weight decay optim.weight_decay (default 0)."""
    return optax.adamw(lr, weight_decay=optim.get("weight_decay", 0.0), **_adam_kwargs(optim))


# Optimizers: name -> (lr schedule, optim config) -> optax transformation. Each passes the
# schedule to optax as its learning rate, so its state holds the one ScaleByScheduleState whose
# count applied_updates reads.
OPTIMIZERS = {"adam": adam, "adamw": adamw}


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optim.optimizer from OPTIMIZERS with its LR_SCHEDULES schedule, after clipping the
    gradients' global norm to optim.grad_clip (0: no clipping)."""
    optim = config.optim
    lr = LR_SCHEDULES[optim.lr_schedule](optim, config.training.num_train_steps)
    opt = OPTIMIZERS[optim.optimizer](lr, optim)
    if optim.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt, lr


def applied_updates(opt_state) -> jax.Array:
    """The optimizer's own count of applied updates: the count its lr schedule is called with."""
    is_count = lambda x: isinstance(x, optax.ScaleByScheduleState)
    (schedule_state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_count) if is_count(s)]
    return schedule_state.count


def init_state(model, optimizer, config, key) -> TrainState:
    """Fresh parameters (EMA starts equal to them) and optimizer state."""
    size, channels = config.data.image_size, config.data.num_channels
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    kwargs = {}
    if objective(config) is OBJECTIVES["diffusion"]:  # a classifier's num_classes is its output
        batch = {"image": jnp.zeros(x.shape, jnp.uint8), "label": jnp.zeros((1,), jnp.int32)}
        kwargs = model_kwargs_from_batch(batch, config)
    return new_state(model.init({"params": key}, x, t, train=False, **kwargs)["params"], optimizer)


def new_state(params, optimizer) -> TrainState:
    """A state at step 0 around given parameters: EMA equal to them, fresh optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def p_uncond(config) -> float:
    """config.conditioning.p_uncond, 0 for a config saved before the field existed."""
    return float(config.get("conditioning", {}).get("p_uncond", 0.0))


def drop_labels(labels, null_label: int, p, key):
    """Each label replaced by the null label with probability p, independently: the label dropout
    that trains one network as both the conditional and the unconditional model of
    classifier-free guidance (Ho & Salimans 2022, Algorithm 1)."""
    drop = jax.random.bernoulli(key, p, labels.shape)
    return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def model_kwargs_from_batch(batch, config, key=None) -> dict:
    """The model keyword arguments of a batch dict.

    `y`: its int32 labels when config.model.num_classes > 0. With a key (training) and
    p_uncond > 0 the labels are dropped onto the null label num_classes (`drop_labels`);
    without one they pass as they are (init, bits/dim, sampling).
    `cond_image`: with a degradation, the batch's own "cond_image" when it has one (float32,
    what the network sees), else DEGRADATIONS[name] of its clean "image", made here (on the
    device, inside the step); its noise (noise_std > 0) is drawn with fold_in(key, 1), or a
    fixed key without one, so evaluation sees the same observations every time.
    """
    kwargs = {}
    num_classes = config.model.get("num_classes", 0)
    if num_classes:
        labels = jnp.asarray(batch["label"], jnp.int32)
        if key is not None and p_uncond(config) > 0:
            labels = drop_labels(labels, num_classes, p_uncond(config), key)
        kwargs["y"] = labels
    name = degradations.configured(config)
    if name:
        if "cond_image" in batch:
            kwargs["cond_image"] = jnp.asarray(batch["cond_image"], jnp.float32)
        else:
            noise_key = jax.random.key(0) if key is None else jax.random.fold_in(key, 1)
            kwargs["cond_image"] = degradations.DEGRADATIONS[name](
                batch["image"], config.conditioning, noise_key
            )
    return kwargs


def as_batch(batch) -> dict:
    """A batch dict; a bare image array is the batch {"image": it} (an unconditional model's)."""
    return batch if isinstance(batch, Mapping) else {"image": batch}


def make_loss_fn(model, schedule: schedules.Schedule, config):
    """loss(params, batch, key) -> (mean loss, terms): the train step's objective.

    batch is {"image": uint8 (B, H, W, C), "label": int32 (B,), ...} (a bare image array is
    taken as {"image": it}); its model keyword arguments come from `model_kwargs_from_batch`.
    key draws t (uniform over the schedule), the noise, the dropout masks, the label dropout and
    the degradation's noise.

    A Refiner (predict-and-refine) diffuses the residual x0 - g(y) given y and g(y), and adds
    its predictor's L2 loss |g(y) - x0|^2 (per-image mean, term "predictor_loss") to the
    diffusion loss. g(y) enters the residual and the conditioning under stop_gradient, so the
    predictor is trained by its L2 loss alone (it stays the regression estimate, the
    distortion end of the perception-distortion curve) and the denoiser by the diffusion loss
    alone: the two stages of the method, trained jointly in one run and one workdir.
    """
    d = config.diffusion
    loss_kw = dict(
        parameterization=d.parameterization,
        var_type=d.var_type,
        loss_type=d.loss_type,
        hybrid_lambda=d.hybrid_lambda,
        noise_conditioning=d.get("noise_conditioning", "timestep"),
    )
    refine = isinstance(model, Refiner)

    def loss(params, batch, key):
        batch = as_batch(batch)
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        x0 = to_model_range(batch["image"])
        t = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_timesteps)
        # The conditioning's key is folded in, not split off: t, noise and dropout masks stay
        # the draws of an unconditional step.
        kwargs = model_kwargs_from_batch(batch, config, jax.random.fold_in(key, 1))
        rngs = {"dropout": dropout_key}
        if refine:
            prediction = model.apply(
                {"params": params},
                kwargs["cond_image"],
                train=True,
                rngs={"dropout": jax.random.fold_in(dropout_key, 1)},
                method=Refiner.predict_clean,
            )
            predictor_loss = jnp.mean(jnp.square(prediction - x0), axis=(1, 2, 3))
            kwargs["prediction"] = jax.lax.stop_gradient(prediction)
            x0 = x0 - kwargs["prediction"]

        def denoise_fn(x_t, t_model, **model_kwargs):
            return model.apply(
                {"params": params}, x_t, t_model, train=True, rngs=rngs, **model_kwargs
            )

        terms = diffusion.training_losses(
            schedule, denoise_fn, x0, t, noise_key, model_kwargs=kwargs, **loss_kw
        )
        if refine:
            terms = dict(terms, predictor_loss=predictor_loss)
            terms["loss"] = terms["loss"] + predictor_loss
        return jnp.mean(terms["loss"]), terms

    return loss


def make_regression_loss_fn(model, schedule: schedules.Schedule, config):
    """loss(params, batch, key) -> (mean loss, terms): L2 regression of the clean image from its
    conditioning image alone, models.refiner.predict (y + net(y, t = 0)): per-image mean squared
    error in the [-1, 1] range (term "loss"). The deterministic baseline of SR3 and of
    predict-and-refine: the MMSE estimate, which a conditional diffusion model's samples are
    compared with. key draws the dropout masks and the degradation's noise; schedule is unused.
    """
    del schedule

    def loss(params, batch, key):
        batch = as_batch(batch)
        x0 = to_model_range(batch["image"])
        y = model_kwargs_from_batch(batch, config, key)["cond_image"]

        def net(x, t, train):
            return model.apply({"params": params}, x, t, train=train, rngs={"dropout": key})

        error = jnp.mean(jnp.square(predict(net, y, train=True) - x0), axis=(1, 2, 3))
        return jnp.mean(error), {"loss": error}

    return loss


def make_classifier_loss_fn(model, schedule: schedules.Schedule, config):
    """loss(params, batch, key) -> (mean loss, terms): the noisy classifier's objective
    (Dhariwal & Nichol 2021, Sec. 4), -log p(y | x_t, t) of classifier_guidance.classifier_losses
    for the batch's images and labels, with terms "loss" and "accuracy" (B,).

    key draws t (uniform over {0, ..., training.t_cutoff - 1}; t_cutoff 0 or absent: the whole
    schedule), the noise and the dropout masks.
    """
    t_cutoff = config.training.get("t_cutoff", 0) or schedule.num_timesteps

    def loss(params, batch, key):
        batch = as_batch(batch)
        if "label" not in batch:
            raise ValueError("the classifier objective needs the batch's labels")
        labels = jnp.asarray(batch["label"], jnp.int32)
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        x0 = to_model_range(batch["image"])
        t = jax.random.randint(t_key, (x0.shape[0],), 0, t_cutoff)

        def logits_fn(x_t, t_model):
            return model.apply(
                {"params": params}, x_t, t_model, train=True, rngs={"dropout": dropout_key}
            )

        terms = classifier_guidance.classifier_losses(schedule, logits_fn, x0, labels, t, noise_key)
        return jnp.mean(terms["loss"]), terms

    return loss


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a train step minimises: make_loss(model, schedule, config) -> loss(params, batch,
    key) -> (mean loss, terms); model_fields(config) -> the config.model fields that follow from
    it (a denoiser's output channels); models: the config.model.name values it trains."""

    make_loss: Callable
    model_fields: Callable
    models: tuple[str, ...]


def _denoiser_fields(config) -> dict:
    """A denoiser outputs C channels, 2C with a learned variance; with a degradation it sees a
    conditioning image of C channels."""
    c, d = config.data.num_channels, config.diffusion
    return {
        "out_channels": diffusion.model_output_channels(c, d.var_type),
        "cond_channels": c if degradations.configured(config) else 0,
    }


def _regression_fields(config) -> dict:
    """A regression network maps the conditioning image (its input) to C channels."""
    return {"out_channels": config.data.num_channels, "cond_channels": 0}


def _classifier_fields(config) -> dict:
    """A classifier's logits are its own field (num_classes): nothing follows."""
    return {}


# The one table of training objectives (config.training.objective).
OBJECTIVES = {
    "diffusion": Objective(make_loss_fn, _denoiser_fields, models=("unet", "refiner")),
    "regression": Objective(make_regression_loss_fn, _regression_fields, models=("unet",)),
    "classifier": Objective(make_classifier_loss_fn, _classifier_fields, models=("classifier",)),
}


def objective(config) -> Objective:
    """The OBJECTIVES entry of config.training.objective ("diffusion" where a config predates
    the field)."""
    name = config.training.get("objective", "diffusion")
    diffusion.check_choice("training.objective", name, OBJECTIVES)
    return OBJECTIVES[name]


def make_train_step(model, schedule: schedules.Schedule, config, optimizer, lr_schedule):
    """step(state, batch, base_key) -> (state, metrics): pure, jit it with shardings.

    batch is a dict of arrays sharded on the batch axis (see `make_loss_fn`).

    The step's randomness is fold_in(base_key, state.step): never reused, and the same after a
    resume. Metrics: loss, grad_norm, lr (the learning rate of this step's update, applied or
    skipped), finite.
    """
    loss_fn = objective(config).make_loss(model, schedule, config)
    ema_decay = config.optim.ema_decay
    ema_warmup = config.optim.get("ema_warmup", False)

    def step(state: TrainState, batch, base_key):
        key = jax.random.fold_in(base_key, state.step)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        decay = ema_decay
        if ema_warmup:  # min(decay, (1 + n) / (10 + n)): early averages forget the init faster
            n = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))

        def update(state, grads):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema_params = jax.tree.map(
                lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
            )
            return params, ema_params, opt_state

        def skip(state, grads):
            return state.params, state.ema_params, state.opt_state

        # A NaN/inf loss or gradient skips the update. A cond, not a select of new or old per
        # leaf after updating, which keeps both states alive (experiments/PERFORMANCE.md).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, ema_params, opt_state = jax.lax.cond(finite, update, skip, state, grads)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema_params,
            opt_state=opt_state,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.first_nonfinite_step < 0) & ~finite,
                state.step + 1,  # the loop and metrics.jsonl call this update step state.step + 1
                state.first_nonfinite_step,
            ),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_schedule(applied_updates(state.opt_state)),  # what this update uses
            "finite": finite,
        }
        return new_state, metrics

    return step
