"""The train step's numbers against plain numpy: Adam with the learning-rate schedules, gradient
clipping by the global norm, the EMA and its warm-up, and the skipped non-finite update.

The diffusion objective's loss is replaced by 0.5 * sum over leaves of (w - target)^2, whose
gradient is w - target: every expected value below is computed in numpy from that, step by step.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from diffusion_jax import training

B1, B2, EPS = 0.9, 0.999, 1e-8


def make_config(**optim):
    base = dict(
        optimizer="adam",
        lr=0.1,
        warmup_steps=0,
        lr_schedule="constant",
        grad_clip=0.0,
        ema_decay=0.9,
        ema_warmup=False,
        beta1=B1,
        beta2=B2,
        eps=EPS,
    )
    return config_dict.ConfigDict({"optim": {**base, **optim}, "training": {"num_train_steps": 10}})


INIT = {"a": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([[3.0, 0.0]], np.float32)}


def target(scale: float = 1.0) -> dict:
    """A batch: the loss pulls the parameters towards it (gradient = w - target)."""
    return {"a": np.full((3,), 0.25 * scale, np.float32), "b": np.full((1, 2), -scale, np.float32)}


@pytest.fixture
def step_fn(monkeypatch):
    """make(config) -> (initial state, train step) with the quadratic loss."""

    def loss_fn(model, schedule, config):
        def loss(params, batch, key):
            terms = jax.tree.map(lambda w, t: jnp.sum((w - t) ** 2), params, batch)
            return 0.5 * sum(jax.tree.leaves(terms)), {}

        return loss

    diffusion_objective = dataclasses.replace(training.OBJECTIVES["diffusion"], make_loss=loss_fn)
    monkeypatch.setitem(training.OBJECTIVES, "diffusion", diffusion_objective)

    def make(config):
        optimizer, lr = training.make_optimizer(config)
        state = training.new_state(jax.tree.map(jnp.asarray, INIT), optimizer)
        step = training.make_train_step(None, None, config, optimizer, lr)
        return state, jax.jit(step)

    return make


class NumpyAdam:
    """Adam (Kingma & Ba) with optional global-norm clipping, in float64 numpy."""

    def __init__(self, params, clip=0.0, per_leaf_clip=False):
        self.p = {k: v.astype(np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.k = 0  # updates applied
        self.clip, self.per_leaf_clip = clip, per_leaf_clip

    def grads(self, batch):
        g = {k: self.p[k] - batch[k] for k in self.p}
        if self.clip:
            norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
            g = {k: x * min(1.0, self.clip / norm) for k, x in g.items()}
        return g

    def update(self, batch, lr):
        self.k += 1
        for name, g in self.grads(batch).items():
            self.m[name] = B1 * self.m[name] + (1 - B1) * g
            self.v[name] = B2 * self.v[name] + (1 - B2) * g**2
            m_hat = self.m[name] / (1 - B1**self.k)
            v_hat = self.v[name] / (1 - B2**self.k)
            self.p[name] = self.p[name] - lr * m_hat / (np.sqrt(v_hat) + EPS)


def assert_tree_close(actual, expected, rtol=2e-5, atol=1e-6):
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(actual[name]), expected[name], rtol, atol, err_msg=name
        )


def test_adam_with_warmup_0_takes_the_full_lr_from_the_first_update(step_fn):
    state, step = step_fn(make_config(warmup_steps=0))
    ref = NumpyAdam(INIT)
    for _ in range(3):
        state, metrics = step(state, target(), jax.random.key(0))
        ref.update(target(), 0.1)
        assert float(metrics["lr"]) == pytest.approx(0.1)
        assert_tree_close(state.params, ref.p)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warmup_update_k_uses_lr_k_over_w_and_a_skipped_step_does_not_advance_it(step_fn, schedule):
    """Update k (1-based, counting applied updates only) uses lr * k / w until w; a skipped
    step logs the lr of the update it skipped, which the next step then uses."""
    warmup, lr, num_steps = 4, 0.1, 10
    config = make_config(warmup_steps=warmup, lr_schedule=schedule)
    config.training.num_train_steps = num_steps
    state, step = step_fn(config)
    ref = NumpyAdam(INIT)

    def expected_lr(k):
        if k <= warmup:
            return lr * k / warmup
        if schedule == "constant":
            return lr
        return lr * 0.5 * (1 + math.cos(math.pi * (k - 1 - warmup) / (num_steps - warmup)))

    nan_batch = {k: np.full_like(v, np.nan) for k, v in target().items()}
    for i in range(1, num_steps + 1):
        skipped = i == 3
        state, metrics = step(state, nan_batch if skipped else target(), jax.random.key(0))
        k = ref.k + 1  # the update this step makes (or skips)
        assert float(metrics["lr"]) == pytest.approx(expected_lr(k), rel=1e-6), i
        if not skipped:
            ref.update(target(), expected_lr(k))
        assert_tree_close(state.params, ref.p)
    assert ref.k == num_steps - 1


def test_cosine_decays_from_the_full_lr_after_warmup_to_near_0_at_the_last_update():
    config = make_config(warmup_steps=2, lr_schedule="cosine")
    config.training.num_train_steps = 12
    _, schedule = training.make_optimizer(config)
    lrs = [float(schedule(count)) for count in range(12)]  # updates 1..12
    assert lrs[:3] == pytest.approx([0.05, 0.1, 0.1])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert 0 < lrs[-1] < 0.1 * 0.03


def test_gradient_clipping_scales_all_leaves_by_the_global_norm(step_fn):
    """Gradient (-2.25 ... ) has global norm about 5.4: clipped to 1, every leaf scaled alike."""
    clip = 1.0
    state, step = step_fn(make_config(grad_clip=clip))
    ref = NumpyAdam(INIT, clip=clip)
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in NumpyAdam(INIT).grads(target()).values()))
    assert norm > 3 * clip
    for scale in (1.0, 3.0, 0.5):  # Adam's later steps see the clipped magnitudes
        state, metrics = step(state, target(scale), jax.random.key(0))
        ref.update(target(scale), 0.1)
        assert_tree_close(state.params, ref.p)
        assert_tree_close(state.opt_state[1][0].nu, ref.v)  # the second moments of clipped g
    assert float(metrics["grad_norm"]) > clip  # the logged norm is before clipping


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_decay_and_its_warmup(step_fn, warmup):
    decay = 0.95
    state, step = step_fn(make_config(ema_decay=decay, ema_warmup=warmup))
    ref = NumpyAdam(INIT)
    ema = {k: v.astype(np.float64) for k, v in INIT.items()}
    for n in range(6):  # n: updates before this one
        state, _ = step(state, target(), jax.random.key(0))
        ref.update(target(), 0.1)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema = {k: d * ema[k] + (1 - d) * ref.p[k] for k in ema}
        assert_tree_close(state.ema_params, ema)
    if warmup:  # the warm-up decays stay below `decay` for these steps: the test sees them
        assert (1 + 5) / (10 + 5) < decay


def test_a_non_finite_step_leaves_params_ema_and_optimizer_state_unchanged(step_fn):
    state, step = step_fn(make_config(grad_clip=1.0, ema_warmup=True))
    for _ in range(2):
        state, _ = step(state, target(), jax.random.key(0))
    before = jax.device_get(state)
    for poison in (np.nan, np.inf):
        bad = {
            k: np.where(np.arange(v.size).reshape(v.shape) == 0, poison, v)
            for k, v in target().items()
        }
        state, metrics = step(state, bad, jax.random.key(0))
        assert not bool(metrics["finite"])
    after = jax.device_get(state)
    for field in ("params", "ema_params", "opt_state"):
        flat_before = jax.tree_util.tree_flatten_with_path(getattr(before, field))[0]
        flat_after = jax.tree_util.tree_flatten_with_path(getattr(after, field))[0]
        assert [p for p, _ in flat_before] == [p for p, _ in flat_after]
        for (path, x), (_, y) in zip(flat_before, flat_after, strict=True):
            assert np.array_equal(x, y), f"{field}{jax.tree_util.keystr(path)} changed"
    assert int(after.step) == 4
    assert int(after.nonfinite_steps) == 2
    assert int(after.first_nonfinite_step) == 3

    state, metrics = step(state, target(), jax.random.key(0))  # and training goes on
    assert bool(metrics["finite"]) and int(state.nonfinite_steps) == 2
    assert int(state.first_nonfinite_step) == 3
