"""Learning-rate schedules and the optimizer chain vs the paper's formulas (NumPy)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfx_jax import train as tr


def paper_rate(step, d_model, warmup):
    """Vaswani et al. 2017, eq. 3, in float64."""
    step = np.float64(step)
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


@pytest.mark.parametrize("d_model,warmup", [(512, 4000), (64, 10)])
def test_transformer_schedule_matches_paper_formula(d_model, warmup):
    config = tr.default_config()
    config.update(schedule="transformer", schedule_d_model=d_model, warmup_steps=warmup,
                  learning_rate=1.0)
    schedule = tr.create_learning_rate_schedule(config)
    steps = [1, 2, warmup // 2, warmup - 1, warmup, warmup + 1, 3 * warmup, 100 * warmup]
    got = np.array([float(schedule(s)) for s in steps])
    want = np.array([paper_rate(s, d_model, warmup) for s in steps])
    peak = (d_model * warmup) ** -0.5
    # optax interpolates the warm-up in float32: absolute error ~ float32 eps * peak
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * peak)
    # the peak is at the end of warm-up and equals d_model^-0.5 * warmup^-0.5
    assert got.argmax() == steps.index(warmup)
    np.testing.assert_allclose(got.max(), peak, rtol=1e-6)


def test_transformer_schedule_scale_and_errors():
    base = tr.transformer_schedule(512, 4000)
    scaled = tr.transformer_schedule(512, 4000, scale=2.0)
    np.testing.assert_allclose(float(scaled(5000)), 2 * paper_rate(5000, 512, 4000), rtol=1e-5)
    assert float(base(0)) == 0.0  # optax counts from 0: the formula's value at step_num 0
    with pytest.raises(ValueError, match="warmup_steps"):
        tr.transformer_schedule(512, 0)


def test_warmup_cosine_endpoints():
    config = tr.default_config()
    config.update(schedule="warmup_cosine", learning_rate=3e-4, warmup_steps=100,
                  num_train_steps=1100, end_learning_rate=1e-5)
    schedule = tr.create_learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(50)), 1.5e-4, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(600)), (3e-4 + 1e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(1100)), 1e-5, rtol=1e-5)


def test_warmup_cosine_counts_optimizer_updates_under_accumulation():
    config = tr.default_config()
    config.update(schedule="warmup_cosine", learning_rate=1.0, warmup_steps=10,
                  num_train_steps=400, grad_accum_steps=4)
    schedule = tr.create_learning_rate_schedule(config)
    np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-7)  # 400 / 4 updates
    np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)


def test_constant_schedule():
    config = tr.default_config()
    config.update(schedule="constant", learning_rate=0.125)
    schedule = tr.create_learning_rate_schedule(config)
    assert [float(schedule(s)) for s in (0, 7, 10**6)] == [0.125] * 3


def _one_update(config, grads, params):
    optimizer, _ = tr.create_optimizer(config)
    state = optimizer.init(params)
    updates, state = optimizer.update(grads, state, params)
    return updates, state, optimizer


def test_adam_first_update_uses_paper_hyperparameters():
    # After one step Adam's bias-corrected moments are g and g^2, so the update is
    # -lr * g / (|g| + eps); with eps = 1e-9 (paper) that is -lr * sign(g).
    config = tr.default_config()
    config.update(schedule="constant", learning_rate=0.01)
    assert (config.b1, config.b2, config.eps) == (0.9, 0.98, 1e-9)
    g = np.array([3.0, -0.5, 1e-3], np.float32)
    updates, _, _ = _one_update(config, {"w": jnp.asarray(g)}, {"w": jnp.zeros(3)})
    want = -0.01 * g / (np.abs(g) + 1e-9)
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5)


def test_adamw_decays_weights():
    config = tr.default_config()
    config.update(schedule="constant", learning_rate=0.1, optimizer="adamw", weight_decay=0.5)
    params = {"w": jnp.full((2,), 2.0)}
    updates, _, _ = _one_update(config, {"w": jnp.zeros(2)}, params)
    # zero gradient: the update is only the decoupled decay -lr * wd * w
    np.testing.assert_allclose(np.asarray(updates["w"]), [-0.1 * 0.5 * 2.0] * 2, rtol=1e-6)


def test_gradient_clipping_by_global_norm():
    config = tr.default_config()
    config.update(schedule="constant", learning_rate=1.0, grad_clip_norm=1.0, b1=0.0, b2=0.0,
                  eps=1.0)
    # with b1 = b2 = 0 and eps = 1 Adam's update is -g / (|g| + 1), g being the clipped gradient
    g = np.array([3.0, 4.0], np.float32)  # norm 5 -> clipped to [0.6, 0.8]
    updates, _, _ = _one_update(config, {"w": jnp.asarray(g)}, {"w": jnp.zeros(2)})
    clipped = g / 5.0
    np.testing.assert_allclose(np.asarray(updates["w"]), -clipped / (clipped + 1.0), rtol=1e-5)


def test_gradient_accumulation_applies_mean_every_k_steps():
    config = tr.default_config()
    config.update(schedule="constant", learning_rate=0.1, grad_accum_steps=2,
                  num_train_steps=10, b1=0.0, b2=0.0, eps=1.0)
    optimizer, _ = tr.create_optimizer(config)
    params = {"w": jnp.zeros(1)}
    state = optimizer.init(params)
    u1, state = optimizer.update({"w": jnp.array([1.0])}, state, params)
    u2, state = optimizer.update({"w": jnp.array([3.0])}, state, params)
    assert float(u1["w"][0]) == 0.0  # accumulating, nothing applied yet
    np.testing.assert_allclose(float(u2["w"][0]), -0.1 * 2.0 / 3.0, rtol=1e-6)  # mean g = 2
    assert isinstance(jax.tree.leaves(state)[0], jax.Array)
    assert isinstance(optimizer, optax.GradientTransformation)
