"""Performance knobs leave results unchanged: fused QKV, gradient accumulation, donation, bf16.

scan_layers and remat_policy are covered in test_models.py; fused QKV inside one
attention layer in test_multihead.py. Here: the knobs at model and training-step level.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tfx_jax as tfx
from tfx_jax import train as tr

TINY = dict(d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0)


def fuse_qkv(params):
    """Separate {query, key, value} self-attention projections -> one fused {qkv}.

    Kernels [..., D, N, H] stack to [..., D, 3, N, H] and biases [..., N, H] to
    [..., 3, N, H] (axis -3 either way, so scanned layers' leading axis is kept).
    Cross-attention stays separate: it projects two different inputs.
    """
    if not isinstance(params, dict):
        return params
    out = {}
    for name, sub in params.items():
        if name == "self_attention" and "query" in sub:
            parts = [sub[n] for n in ("query", "key", "value")]
            out[name] = {"out": sub["out"], "qkv": {
                leaf: np.stack([p[leaf] for p in parts], axis=-3) for leaf in parts[0]}}
        else:
            out[name] = fuse_qkv(sub)
    return out


def tiny_vit(**knobs):
    return tfx.ViT(tfx.ViTConfig(image_size=8, patch_size=4, num_classes=5,
                                 **{**TINY, "num_layers": 2, **knobs}))


def tiny_lm(**knobs):
    return tfx.CausalLM(tfx.CausalLMConfig(vocab_size=40, max_len=8, **{**TINY, **knobs}))


@pytest.mark.parametrize("kind", ["transformer", "vit_scanned"])
def test_fused_qkv_model_gives_the_same_logits_as_separate_projections(kind):
    if kind == "transformer":
        def make(**knobs):
            return tfx.Transformer(tfx.TransformerConfig(
                vocab_size=30, num_encoder_layers=1, num_decoder_layers=1, max_len=8,
                **TINY, **knobs))
        rng = np.random.default_rng(0)
        inputs = (jnp.asarray(rng.integers(1, 30, (2, 7))),
                  jnp.asarray(rng.integers(1, 30, (2, 5))))
    else:
        def make(**knobs):
            return tiny_vit(scan_layers=True, **knobs)
        inputs = (jax.random.normal(jax.random.key(1), (2, 8, 8, 3)),)
    separate, fused = make(), make(fused_qkv=True)
    params = jax.device_get(jax.jit(separate.init)(jax.random.key(0), *inputs)["params"])
    fused_params = fuse_qkv(params)
    fused_shapes = jax.eval_shape(fused.init, jax.random.key(0), *inputs)["params"]
    chex.assert_trees_all_equal_shapes(fused_shapes, fused_params)
    assert jax.tree.structure(fused_params) != jax.tree.structure(params)
    np.testing.assert_allclose(jax.jit(fused.apply)({"params": fused_params}, *inputs),
                               jax.jit(separate.apply)({"params": params}, *inputs), atol=1e-5)


# --- the training step's knobs ----------------------------------------------------------------

def fixed_init(model, dummy_input):
    """init_params for a Task that returns one set of parameters, computed once.

    Eager ``model.init`` compiles every op on its own; one jitted init, shared by
    every run of a test, keeps these tests fast.
    """
    params = jax.device_get(jax.jit(model.init)(jax.random.key(0), dummy_input)["params"])
    return lambda rng: params


@functools.cache
def vit_task():
    model = tiny_vit(num_layers=1)

    def loss_fn(params, batch, rng, train):  # mean over examples
        logits = model.apply({"params": params}, batch["images"])
        return tr.classification_cross_entropy(logits, batch["labels"]), {}

    return tr.Task(fixed_init(model, jnp.zeros((1, 8, 8, 3))), loss_fn)


def image_batches(num, size, seed=0):
    rng = np.random.default_rng(seed)
    return [{"images": rng.standard_normal((size, 8, 8, 3), dtype=np.float32),
             "labels": rng.integers(0, 5, size, dtype=np.int32)} for _ in range(num)]


def initial_state(task, optimizer, mesh):
    """The step-0 state, placed as the step's outputs are (so the step compiles once)."""
    state = tr.create_train_state(task.init_params, optimizer, seed=0)
    return jax.device_put(state, tr.replicated_sharding(mesh))


def run_steps(task, optimizer, batches, *, schedule=optax.constant_schedule(0.0),
              grad_accum_steps=1, donate=True):
    """Trains from the task's parameters; returns the final state and
    [(params, metrics)] before the first and after each step."""
    mesh = tr.make_data_mesh()
    state = initial_state(task, optimizer, mesh)
    step = tr.make_train_step(task.loss_fn, optimizer, schedule, mesh,
                              grad_accum_steps=grad_accum_steps, donate=donate)
    history = [(jax.device_get(state.params), None)]
    for batch in batches:
        state, metrics = step(state, tr.shard_batch(batch, mesh))
        history.append((jax.device_get(state.params), jax.device_get(metrics)))
    return state, history


def halves(batch):
    return [jax.tree.map(lambda x: x[:8], batch), jax.tree.map(lambda x: x[8:], batch)]


def test_accumulating_k_micro_batches_equals_one_step_on_their_concatenation():
    def config(**overrides):
        c = tr.default_config()
        # eps = 10 >> |gradient|: Adam then scales with the gradient like SGD, so an
        # accumulator that summed instead of averaging would fail the comparison.
        c.update(schedule="warmup_cosine", learning_rate=0.5, warmup_steps=1, eps=10.0,
                 num_train_steps=8)
        c.update(overrides)
        return c

    task, big = vit_task(), image_batches(2, 16)
    optimizer, schedule = tr.create_optimizer(config(batch_size=16))
    _, want = run_steps(task, optimizer, big, schedule=schedule)
    optimizer, schedule = tr.create_optimizer(config(batch_size=8, grad_accum_steps=2))
    micro = [m for batch in big for m in halves(batch)]
    _, got = run_steps(task, optimizer, micro, schedule=schedule, grad_accum_steps=2)
    initial = got[0][0]
    chex.assert_trees_all_equal(got[1][0], initial)  # no update after the first micro-batch
    for update in (1, 2):
        params, metrics = got[2 * update]
        chex.assert_trees_all_close(params, want[update][0], atol=1e-6, rtol=1e-5)
        assert metrics["learning_rate"] == pytest.approx(want[update][1]["learning_rate"])
    assert want[2][1]["learning_rate"] > 0  # the second update moved, at the schedule's rate
    assert not np.allclose(want[2][0]["head"]["kernel"], want[1][0]["head"]["kernel"])


def test_donation_changes_memory_reuse_not_results():
    task, batches = vit_task(), image_batches(3, 16, seed=2)
    optimizer = optax.adam(1e-2)
    mesh = tr.make_data_mesh()
    results = {}
    for donate in (True, False):
        state = initial_state(task, optimizer, mesh)
        step = tr.make_train_step(task.loss_fn, optimizer, optax.constant_schedule(1e-2), mesh,
                                  donate=donate)
        first = state
        for batch in batches:
            state, _ = step(state, tr.shard_batch(batch, mesh))
        results[donate] = jax.device_get(state)
        # Donated: the input state's buffers were consumed; not donated: still usable.
        assert jax.tree.leaves(first.params)[0].is_deleted() == donate
    chex.assert_trees_all_equal(results[True], results[False])


@functools.cache
def lm_init_params():
    return fixed_init(tiny_lm(num_layers=1), jnp.ones((1, 8), jnp.int32))


def lm_task(dtype):
    model = tiny_lm(dtype=dtype, num_layers=1)

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["tokens"][:, :-1])
        loss, _ = tr.token_cross_entropy(logits, batch["tokens"][:, 1:])
        return loss, {}

    return tr.Task(lm_init_params(), loss_fn)  # the same float32 parameters for any dtype


def test_bfloat16_compute_with_float32_master_weights_trains_like_float32():
    rng = np.random.default_rng(3)
    batches = [{"tokens": rng.integers(1, 40, (8, 9), dtype=np.int32)} for _ in range(5)]
    optimizer = optax.adam(3e-3)
    state32, hist32 = run_steps(lm_task("float32"), optimizer, batches)
    state16, hist16 = run_steps(lm_task("bfloat16"), optimizer, batches)
    for leaf in jax.tree.leaves((state16.params, state16.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    loss32 = np.array([m["loss"] for _, m in hist32[1:]])
    loss16 = np.array([m["loss"] for _, m in hist16[1:]])
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
    assert loss16[-1] < loss16[0]  # it trains
    chex.assert_trees_all_close(hist16[-1][0], hist32[-1][0], atol=2e-2)
