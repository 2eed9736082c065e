"""FSDP + tensor parallelism on 8 simulated devices: same numbers, 1/N of the memory.

The reference for every sharded run is the same computation on ONE device:
GSPMD may only change where the arithmetic happens, never its result (float32,
rtol 1e-5, differences come from the order of the gradient reductions).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding_tasks as st
import tfx_jax as tfx
from tfx_jax import train as tr
from tfx_jax.logical_axes import recording_logical_axes, with_axes

BATCH = 8
STEPS = 10
SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
OPTIMIZER = optax.adam(1e-2)


def mesh_of(shape, devices=None):
    return tr.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), devices)


def run_steps(task, mesh, steps=STEPS):
    shardings = tr.train_state_shardings(task.init_params, OPTIMIZER, mesh)
    state = tr.create_sharded_train_state(task.init_params, OPTIMIZER, 0, shardings)
    step = tr.make_train_step(task.loss_fn, OPTIMIZER, optax.constant_schedule(1e-2), mesh,
                              state_shardings=shardings)
    losses = []
    for i in range(1, steps + 1):
        state, metrics = step(state, tr.shard_batch(st.make_batch(i, BATCH), mesh))
        losses.append(metrics["loss"])
    return state, np.asarray(jax.device_get(losses)), shardings


_REFERENCE = {}


def one_device_losses(kind):
    if kind not in _REFERENCE:
        _REFERENCE[kind] = run_steps(st.make_task(kind), mesh_of((1, 1, 1), jax.devices()[:1]))[1]
    return _REFERENCE[kind]


# --- the mesh ----------------------------------------------------------------------------------

def test_make_mesh_fills_the_remaining_devices_and_names_three_axes():
    assert jax.device_count() == 8
    mesh = tr.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == (2, 2, 2)
    assert tr.make_mesh().devices.shape == (8, 1, 1)          # default: data parallel
    assert tr.make_data_mesh().devices.shape == (8, 1, 1)
    assert tr.make_mesh({"fsdp": -1}).devices.shape == (1, 8, 1)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert tr.make_mesh({"data": 1}, jax.devices()[:1]).devices.size == 1


@pytest.mark.parametrize("mesh_config, message", [
    ({"data": 3}, r"data x fsdp x tensor = 3 x 1 x 1 = 3 devices, but there are 8"),
    ({"data": 2, "fsdp": 2, "tensor": 3}, r"= 12 devices, but there are 8"),
    ({"fsdp": 0}, r"config.mesh.fsdp must be a positive integer or -1 .*got 0"),
    ({"tensor": -2}, r"config.mesh.tensor must be a positive integer or -1"),
    ({"model": 2}, r"unknown axis name\(s\) \['model'\]"),
    ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
    ({"data": -1, "fsdp": 3}, r"the fixed axes \(3 devices\) do not divide the 8 devices"),
])
def test_bad_mesh_config_is_one_clear_error(mesh_config, message):
    with pytest.raises(ValueError, match=message):
        tr.make_mesh(mesh_config)


def test_config_mesh_is_validated_with_the_rest_of_the_config():
    config = tr.default_config()
    assert dict(config.mesh) == {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}
    tr.validate_config(config)
    config.mesh.fsdp = 0
    with pytest.raises(ValueError, match=r"config.mesh.fsdp must be a positive integer or -1"):
        tr.validate_config(config)
    config.mesh.fsdp = 1
    config.mesh.model = 2
    with pytest.raises(ValueError, match=r"config.mesh has unknown axis name\(s\) \['model'\]"):
        tr.validate_config(config)


def test_batch_splits_over_data_and_fsdp_and_repeats_over_tensor():
    mesh = mesh_of((2, 2, 2))
    tr.check_batch_size(4, mesh)
    with pytest.raises(ValueError, match=r"config.batch_size = 6 must be divisible by the number "
                                         r"of devices in the mesh \(4\) that split the batch"):
        tr.check_batch_size(6, mesh)
    sharded = tr.shard_batch({"y": np.arange(8)}, mesh)
    rows = {shard.device: np.asarray(shard.data).tolist()
            for shard in sharded["y"].addressable_shards}
    for (data, fsdp, tensor), device in np.ndenumerate(mesh.devices):
        start = 2 * (2 * data + fsdp)
        assert rows[device] == [start, start + 1], (data, fsdp, tensor)


# --- the parameters carry names; the rules place them ------------------------------------------

def test_init_stays_plain_and_names_are_recorded_only_on_request():
    task = st.make_task("lm")
    plain = task.init_params(jax.random.PRNGKey(0))
    assert not any(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(
        plain, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
    with recording_logical_axes():
        boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
    names = nn.get_partition_spec(boxed)
    layer = names["layers"]["layers"]
    assert tuple(layer["self_attention"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(layer["self_attention"]["out"]["kernel"]) == ("layers", "heads", "kv", "embed")
    assert tuple(layer["ffn"]["wi"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(layer["ffn"]["wo"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(names["embedding"]["embedding"]) == ("vocab", "embed")
    assert tuple(names["logits"]["kernel"]) == ("embed", "vocab")
    # and the boxed parameters still apply like plain ones
    model = st.lm_model()
    tokens = jnp.asarray(st.make_batch(1, 2)["inputs"])
    with recording_logical_axes():
        boxed_params = model.init({"params": jax.random.PRNGKey(0)}, tokens)["params"]
    np.testing.assert_allclose(model.apply({"params": boxed_params}, tokens),
                               model.apply({"params": plain}, tokens), rtol=1e-6)


def test_megatron_and_fsdp_layout_of_the_weights():
    mesh = mesh_of((2, 2, 2))
    shardings = tr.train_state_shardings(st.make_task("transformer").init_params, OPTIMIZER, mesh)
    layer = shardings.params["decoder"]["layers"]["layer_0"]
    spec = lambda s: tuple(s.spec)  # noqa: E731
    assert spec(layer["self_attention"]["query"]["kernel"]) == ("fsdp", "tensor", None)
    assert spec(layer["cross_attention"]["key"]["kernel"]) == ("fsdp", "tensor", None)
    assert spec(layer["self_attention"]["out"]["kernel"]) == ("tensor", None, "fsdp")
    assert spec(layer["ffn"]["wi"]["kernel"]) == ("fsdp", "tensor")  # column-parallel
    assert spec(layer["ffn"]["wo"]["kernel"]) == ("tensor", "fsdp")  # row-parallel
    assert spec(layer["ffn_norm"]["scale"]) == (None,)                # replicated
    assert spec(shardings.params["source_embedding"]["embedding"]) == ("tensor", "fsdp")
    # Adam's moments mirror the parameters; the step counters are replicated
    adam = shardings.opt_state[0]
    assert spec(adam.mu["decoder"]["layers"]["layer_0"]["ffn"]["wi"]["kernel"]) == (
        "fsdp", "tensor")
    assert spec(adam.nu["source_embedding"]["embedding"]) == ("tensor", "fsdp")
    assert spec(adam.count) == ()
    assert spec(shardings.step) == spec(shardings.rng) == ()


def test_vit_weights_are_split_and_its_small_heads_stay_whole():
    model = tfx.ViT(tfx.ViTConfig(image_size=8, patch_size=4, num_classes=10, num_layers=1,
                                  **st.TINY))
    init = lambda rng: model.init(rng, jnp.zeros((1, 8, 8, 3)))["params"]  # noqa: E731
    shardings = tr.train_state_shardings(init, OPTIMIZER, mesh_of((1, 2, 4))).params
    assert tuple(shardings["patch_embedding"]["kernel"].spec) == (None, None, None, "fsdp")
    assert tuple(shardings["head"]["kernel"].spec) == ("fsdp", None)  # 10 classes: whole
    assert tuple(shardings["encoder"]["layer_0"]["ffn"]["wi"]["kernel"].spec) == (
        "fsdp", "tensor")


# --- same numbers on every mesh ----------------------------------------------------------------

# The LM on every mesh; the Transformer (cross-attention, two embeddings) on the two meshes
# that split over all three axes and over tensor=4 (its 8x1x1 and 2x4x1 runs only repeated
# what the LM's and these show: each compile costs seconds).
@pytest.mark.slow
@pytest.mark.parametrize("kind, shape",
                         [("lm", shape) for shape in SHAPES]
                         + [("transformer", (2, 2, 2)), ("transformer", (1, 2, 4))],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_every_mesh_trains_like_one_device(kind, shape):
    state, losses, shardings = run_steps(st.make_task(kind), mesh_of(shape))
    np.testing.assert_allclose(losses, one_device_losses(kind), rtol=1e-5)
    assert losses[-1] < losses[0]
    # the step kept the state where the rules put it (donation works on sharded buffers)
    for array, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim)


# --- 1/(fsdp x tensor) of the bytes per device -------------------------------------------------

def _bytes_per_device(tree) -> dict:
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2), (1, 2, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_state_bytes_per_device_shrink_by_fsdp_times_tensor(shape):
    task = st.make_task("lm", d_ff=128)
    mesh = mesh_of(shape)
    shardings = tr.train_state_shardings(task.init_params, OPTIMIZER, mesh)
    state = tr.create_sharded_train_state(task.init_params, OPTIMIZER, 0, shardings)
    split = shape[1] * shape[2]
    # leaves split over both fsdp and tensor (every matrix here): exactly 1/(fsdp x tensor)
    both = [leaf for leaf, s in zip(jax.tree.leaves((state.params, state.opt_state)),
                                    jax.tree.leaves((shardings.params, shardings.opt_state)))
            if {"fsdp", "tensor"} <= set(jax.tree.leaves(tuple(s.spec)))]
    total = sum(x.nbytes for x in both)
    assert total > 0.9 * sum(x.nbytes for x in jax.tree.leaves(state))
    for device_bytes in _bytes_per_device(both).values():
        assert abs(device_bytes - total / split) <= 0.1 * total / split
    # the initialisation itself only ever produced shards: its compiled per-device outputs
    # are this device's share of the whole state, not the whole state
    whole = sum(x.nbytes for x in jax.tree.leaves(state))
    share = max(_bytes_per_device(state).values())
    assert share < 1.2 * whole / split  # + a few small replicated leaves (LayerNorm, biases)
    create = jax.jit(lambda: tr.create_train_state(task.init_params, OPTIMIZER, 0),
                     out_shardings=shardings)
    out_bytes = create.lower().compile().memory_analysis().output_size_in_bytes
    assert abs(out_bytes - share) <= 0.05 * share


def test_data_parallel_default_replicates_the_state():
    task = st.make_task("lm")
    mesh = tr.make_mesh()
    state = tr.create_sharded_train_state(task.init_params, OPTIMIZER, 0, mesh)
    whole = sum(x.nbytes for x in jax.tree.leaves(state))
    assert set(_bytes_per_device(state).values()) == {whole}


# --- errors before any work --------------------------------------------------------------------

def test_heads_that_do_not_divide_the_tensor_axis_are_named():
    task = st.make_task("lm")  # 4 heads on tensor = 8
    with pytest.raises(ValueError, match=r"parameter params/layers/layers/self_attention/"
                                         r"(query|key|value)/(kernel|bias) of shape "
                                         r"\((1, 32, 4, 8|1, 4, 8)\): dimension \d "
                                         r"\('(kv_)?heads', size 4\) is split over "
                                         r"mesh axis tensor of size 8"):
        tr.train_state_shardings(task.init_params, OPTIMIZER, mesh_of((1, 1, 8)))


def test_vocab_that_does_not_divide_the_tensor_axis_is_named():
    task = st.make_task("lm", vocab_size=50)
    with pytest.raises(ValueError, match=r"parameter params/embedding/embedding of shape "
                                         r"\(50, 32\): dimension 0 \('vocab', size 50\) is "
                                         r"split over mesh axis tensor of size 4"):
        tr.train_state_shardings(task.init_params, OPTIMIZER, mesh_of((1, 2, 4)))


def test_d_model_that_does_not_divide_fsdp_is_named():
    task = st.make_task("lm", d_model=36, num_heads=4)
    with pytest.raises(ValueError, match=r"\('embed', size 36\) is split over mesh axis fsdp "
                                         r"of size 8"):
        tr.train_state_shardings(task.init_params, OPTIMIZER, mesh_of((1, 8, 1)))


class _Misnamed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, kernel_init=with_axes(nn.initializers.lecun_normal(),
                                                 ("embedd", "mlp")))(x)


def test_unknown_logical_name_is_named():
    init = lambda rng: _Misnamed().init(rng, jnp.ones((1, 8)))["params"]  # noqa: E731
    with pytest.raises(ValueError, match=r"parameter params/Dense_0/kernel \(shape \(8, 4\)\) "
                                         r"has logical axis name\(s\) \['embedd'\]"):
        tr.train_state_shardings(init, OPTIMIZER, mesh_of((8, 1, 1)))


def test_train_rejects_a_mesh_that_does_not_fit_before_writing_anything(tmp_path):
    config = tr.default_config()
    config.batch_size, config.num_train_steps, config.warmup_steps = BATCH, 2, 0
    config.mesh.data, config.mesh.tensor = 1, 8
    with pytest.raises(ValueError, match=r"size 4\) is split over mesh axis tensor of size 8"):
        tr.train(config, str(tmp_path / "run"), st.make_task("lm"), st.Batches(BATCH))
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- checkpoints move between meshes -----------------------------------------------------------

_config, _losses = st.train_config, st.train_losses


@pytest.mark.slow
def test_checkpoint_saved_on_fsdp8_resumes_on_one_device_and_on_2x2x2(tmp_path):
    import shutil
    task = st.make_task("lm")
    first = tmp_path / "fsdp8"  # the uninterrupted run, with a checkpoint at step 3
    config = _config(6, data=1, fsdp=8)
    config.checkpoint_every_steps = 3
    tr.train(config, str(first), task, st.Batches(BATCH))
    expected = [l for s, l in _losses(first) if s > 3]
    for name, mesh in (("one_device", mesh_of((1, 1, 1), jax.devices()[:1])),
                       ("2x2x2", mesh_of((2, 2, 2)))):
        workdir = tmp_path / name
        shutil.copytree(first / "checkpoints" / "3", workdir / "checkpoints" / "3")
        result = tr.train(_config(6), str(workdir), task, st.Batches(BATCH), mesh=mesh)
        assert result.start_step == 3
        got = _losses(workdir)
        assert [s for s, _ in got] == [4, 5, 6]
        np.testing.assert_allclose([l for _, l in got], expected, rtol=1e-5)
        kernel = result.state.params["layers"]["layers"]["ffn"]["wi"]["kernel"]
        assert kernel.sharding.mesh.devices.shape == mesh.devices.shape
        if name == "2x2x2":
            assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
            assert tuple(result.state.opt_state[0].mu["layers"]["layers"]["ffn"]["wi"][
                "kernel"].sharding.spec) == (None, "fsdp", "tensor")
    # inference restores the fsdp=8 parameters onto any mesh, placed by the rules
    params = tr.restore_params(str(first), task.init_params, mesh=mesh_of((1, 2, 4)))
    embedding = params["embedding"]["embedding"]
    assert tuple(embedding.sharding.spec) == ("tensor", "fsdp")
    assert embedding.addressable_shards[0].data.shape == (16, 16)
