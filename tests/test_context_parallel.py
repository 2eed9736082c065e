"""Context parallelism (the sequence split over devices) on 8 simulated CPU devices.

Every output and gradient is compared with single-device dense attention
(``implementation="dense"``, which materialises the scores) on the same inputs.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import sharding_tasks as st
import tfx_jax as tfx
from tfx_jax.attention import dot_product_attention
from tfx_jax.context_parallel import tile_counts
from tfx_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(atol=1e-5, rtol=1e-5)
AUTO = jax.sharding.AxisType.Auto
# Meshes by context size: the other axes shard batch (data) and heads (tensor) too.
MESHES = {2: {"data": 2, "context": 2, "tensor": 2}, 4: {"data": 2, "context": 4},
          8: {"context": 8}}


def make_mesh(axes):
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AUTO,) * len(axes),
                         devices=jax.devices()[:int(np.prod(list(axes.values())))])


def inputs(t, s=None, *, b=2, n=4, k=4, h=8, seed=0):
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = rng.standard_normal((b, t, n, h))
    key, value = rng.standard_normal((2, b, s, k, h))
    d_out = rng.standard_normal((b, t, n, h))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, key, value, d_out))


def value_and_grads(attend, q, k, v, d_out):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out,) + vjp(d_out)


def assert_matches_dense(context, strategy, *, t=48, s=None, causal=False, b=2, n=4, k=4,
                         block=4, load_balance=True, **options):
    """context_parallel_attention == dense on one device: output and dQ, dK, dV."""
    mesh = make_mesh(MESHES[context])
    q, key, value, d_out = inputs(t, s, b=b, n=n, k=k)
    sharded = NamedSharding(mesh, PartitionSpec(None, "context"))
    attend = lambda q, k, v: tfx.context_parallel_attention(
        q, k, v, mesh=mesh, strategy=strategy, causal=causal, block_q=block, block_kv=block,
        load_balance=load_balance, **options)
    cp = jax.jit(lambda *xs: value_and_grads(attend, *xs))(
        *(jax.device_put(x, sharded) for x in (q, key, value, d_out)))
    dense = value_and_grads(lambda q, k, v: dot_product_attention(
        q, k, v, causal=causal, implementation="dense", **options), q, key, value, d_out)
    for name, got, want in zip(("out", "d_q", "d_k", "d_v"), cp, dense):
        np.testing.assert_allclose(got, want, err_msg=name, **TOL)
    assert cp[0].sharding.spec[1] == "context"  # sharded like the query
    return max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(cp, dense))


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
@pytest.mark.parametrize("context", [2, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_attention(strategy, context, causal):
    # 48 positions: 3 blocks of 4 per run at context 2 (2 runs of 12 with causal),
    # 3 per run at context 8 (runs of 3: one partial tile of a 4-wide block).
    assert_matches_dense(context, strategy, causal=causal, t=48)


SEGMENTS = np.array([[1] * 10 + [2] * 20 + [3] * 14 + [0] * 4,
                     [1] * 3 + [2] * 40 + [0] * 5], np.int32)


FEATURES = {
    "segments_gqa": dict(causal=True, q_segment_ids=SEGMENTS, n=4, k=2),  # packed rows, GQA
    "segments_mqa": dict(causal=False, q_segment_ids=SEGMENTS, k=1),      # multi-query
    "sliding_window": dict(causal=True, local_window=(5, 0)),
    "two_sided_window": dict(causal=False, local_window=(3, 7), block=3),  # 4 tiles a run
    "partial_tiles": dict(causal=True, block=5),                 # runs of 6: tiles of 5 and 1
    "cross_attention": dict(causal=False, s=96),                  # S = 2T
    "plain_split": dict(causal=True, load_balance=False),
    "lengths": dict(causal=False, q_lengths=np.array([40, 17]), kv_lengths=np.array([48, 30])),
    "kv_lengths": dict(causal=False, s=96, kv_lengths=np.array([96, 30])),  # encoder padding
}


@pytest.mark.parametrize("strategy, case", [("ring", name) for name in FEATURES] + [
    ("all_gather", name) for name in ("segments_gqa", "two_sided_window", "kv_lengths")])
def test_matches_dense_with_masks_and_grouped_heads(strategy, case):
    case = dict(FEATURES[case])
    if "q_segment_ids" in case:
        case["q_segment_ids"] = jnp.asarray(case["q_segment_ids"])
    assert_matches_dense(4, strategy, **case)


def test_causal_work_is_balanced_by_the_zig_zag_order():
    shape = (1, 512, 2, 8)
    for context in (2, 4, 8):
        mesh = make_mesh({"context": context})
        count = lambda **kw: tile_counts(shape, shape, mesh=mesh, block_q=8, block_kv=8, **kw)
        for strategy in ("ring", "all_gather"):
            balanced = count(strategy=strategy, causal=True)
            assert max(balanced) <= 1.1 * min(balanced), (context, strategy, balanced)
            # the tiles cover every visible pair, and skip the hidden ones: about half
            full = count(strategy=strategy, causal=False)
            assert sum(balanced) * 64 >= 512 * 513 // 2, balanced
            assert sum(balanced) < 0.6 * sum(full), (balanced, full)
        plain = count(causal=True, load_balance=False)
        assert max(plain) > 1.5 * min(plain), plain  # the first device skips most of its work
        window = count(causal=True, local_window=(16, 0))
        assert sum(window) < 0.15 * sum(full), window


_MEMORY_PROBE = textwrap.dedent("""
    import json, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    import tfx_jax as tfx

    def temp_bytes(context):
        mesh = jax.make_mesh((context,), ("context",), devices=jax.devices()[:context],
                             axis_types=(jax.sharding.AxisType.Auto,))
        x = jax.ShapeDtypeStruct((1, 8192, 2, 64), jnp.float32,
                                 sharding=NamedSharding(mesh, PartitionSpec(None, "context")))
        def grads(q, k, v, d_out):
            attend = lambda q, k, v: tfx.context_parallel_attention(
                q, k, v, mesh=mesh, causal=True, block_q=128, block_kv=128)
            return jax.vjp(attend, q, k, v)[1](d_out)
        compiled = jax.jit(grads).lower(x, x, x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    print(json.dumps({c: temp_bytes(c) for c in (1, 2, 4, 8)}))
""")


def test_ring_memory_per_device_falls_with_the_context_size():
    # YNN fusion hides temp buffers; the flag must be set before the backend starts.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type="
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    temp = {int(c): b for c, b in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    for context in (4, 8):  # each doubling of the ring halves a device's temporaries
        ratio = temp[context] / temp[context // 2]
        assert 0.4 < ratio < 0.6, temp
    assert temp[8] < temp[1] / 3, temp  # context 1: the chunked kernel on one device


@pytest.mark.parametrize("call, message", [
    (dict(t=42), r"over 'context' \(4 devices\): q_length=42 is not divisible by 4"),
    (dict(t=36, causal=True), r"q_length=36 is not divisible by 8 \(causal load balancing cuts "
                              r"it into 2 x 4 chunks; load_balance=False needs only 4\)"),
    (dict(t=48, s=50), r"kv_length=50 is not divisible by 4"),
    (dict(strategy="ulysses"), r"strategy must be one of \('ring', 'all_gather'\), got 'ulysses'"),
    (dict(axis_name="sequence"), r"over axis 'sequence': the mesh has axes \['data', 'context'\]"),
])
def test_bad_input_is_one_clear_error(call, message):
    call = dict(call)
    q, k, v, _ = inputs(call.pop("t", 48), call.pop("s", None))
    with pytest.raises(ConfigError, match=message):
        tfx.context_parallel_attention(q, k, v, mesh=make_mesh(MESHES[4]), **call)


# --- the models: MultiHeadAttention dispatches under a mesh with a context axis ------------------

def under_mesh(mesh, fn, *args):
    """``fn(*args)`` traced with ``mesh`` active, as the training library traces its step."""
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return jax.jit(traced)(*jax.device_put(args, NamedSharding(mesh, PartitionSpec())))


def test_causal_lm_under_a_context_mesh_gives_the_one_device_loss_and_gradients():
    config = tfx.CausalLMConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=4,
                                num_kv_heads=2, d_ff=32, max_len=32, position="rope")
    model = tfx.CausalLM(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 32, (2, 32)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1, 2, 3, 0]], 8, axis=1).repeat(2, 0), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]

    def loss(params, tokens, segment_ids):
        logits = model.apply({"params": params}, tokens, segment_ids=segment_ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (segment_ids > 0))

    one_device = jax.jit(jax.value_and_grad(loss))(params, tokens, segment_ids)
    mesh = make_mesh({"data": 2, "context": 4})
    split = under_mesh(mesh, jax.value_and_grad(loss), params, tokens, segment_ids)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), split, one_device)
    traced = str(jax.make_jaxpr(lambda *a: under_mesh(mesh, loss, *a))(params, tokens,
                                                                       segment_ids))
    assert "ppermute" in traced and "shard_map" in traced  # the ring really ran


def test_context_mesh_with_an_implementation_that_cannot_split_is_one_clear_error():
    mha = tfx.MultiHeadAttention(num_heads=2, implementation="dense")
    x = jnp.zeros((2, 16, 8))
    params = mha.init(jax.random.key(0), x)
    with pytest.raises(ConfigError, match=r"implementation='dense' cannot run with the "
                                          r"sequence split over the mesh's context axis \(4 "
                                          r"devices\); use 'auto' or 'chunked'"):
        under_mesh(make_mesh({"data": 2, "context": 4}), lambda p, x: mha.apply(p, x),
                   params, x)


# --- training: config.mesh.context splits the sequence in the train step ------------------------

BATCH = 8
train_config, train_losses = st.train_config, st.train_losses


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lm", "transformer"])
def test_training_on_a_context_mesh_gives_the_one_device_losses_and_checkpoints_move(kind,
                                                                                      tmp_path):
    import shutil
    import tfx_jax.train as tr
    # Without biases on the projections: a key bias gets a gradient that is zero in exact
    # arithmetic (softmax ignores a per-query constant), and Adam turns its rounding noise,
    # whose sign depends on the order of the sums, into full-size steps.
    task = st.make_task(kind, use_bias=False)
    split = tmp_path / "context"  # data 2 x context 4, a checkpoint at step 5 of 10
    config = train_config(10, data=2, context=4)
    config.checkpoint_every_steps = 5
    result = tr.train(config, str(split), task, st.Batches(BATCH))
    assert result.state.params["embedding" if kind == "lm" else "source_embedding"][
        "embedding"].sharding.mesh.axis_names == ("data", "fsdp", "context", "tensor")
    one = tmp_path / "one_device"
    tr.train(train_config(10), str(one), task, st.Batches(BATCH),
             mesh=tr.make_mesh({"data": 1}, jax.devices()[:1]))
    np.testing.assert_allclose([l for _, l in train_losses(split)],
                               [l for _, l in train_losses(one)], rtol=1e-5)
    if kind != "lm":
        return
    # the context-split checkpoint resumes on a mesh without a context axis
    workdir = tmp_path / "data8"
    shutil.copytree(split / "checkpoints" / "5", workdir / "checkpoints" / "5")
    resumed = tr.train(train_config(10, data=8), str(workdir), task, st.Batches(BATCH))
    assert resumed.start_step == 5
    np.testing.assert_allclose([l for _, l in train_losses(workdir)],
                               [l for s, l in train_losses(one) if s > 5], rtol=1e-5)
