"""Checkpointer: train state plus real Grain iterator states (dict and bytes forms)."""
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfx_jax import train as tr


def init_params(rng):
    return {"w": jax.random.normal(rng, (4, 3)), "b": jnp.zeros(3)}


OPTIMIZER = optax.adam(1e-3)


def make_state(mesh, step=0):
    state = jax.jit(lambda: tr.create_train_state(init_params, OPTIMIZER, seed=3),
                    out_shardings=tr.replicated_sharding(mesh))()
    return state.replace(step=jnp.asarray(step, jnp.int32))


def abstract(mesh):
    return tr.abstract_train_state(init_params, OPTIMIZER, 3, tr.replicated_sharding(mesh))


def dataset_iterator():
    """grain DatasetIterator: get_state() is a dict."""
    ds = grain.MapDataset.range(40).shuffle(seed=1).repeat().batch(4)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


def data_loader_iterator():
    """grain DataLoader iterator: get_state() is bytes."""
    loader = grain.DataLoader(
        data_source=grain.sources.RangeDataSource(0, 40, 1),
        sampler=grain.samplers.IndexSampler(40, shard_options=grain.sharding.NoSharding(),
                                            shuffle=True, seed=1, num_epochs=None),
        operations=[grain.transforms.Batch(4)], worker_count=0)
    return iter(loader)


@pytest.mark.parametrize("make_iterator,state_type", [(dataset_iterator, dict),
                                                       (data_loader_iterator, bytes)])
def test_iterator_state_round_trips_through_checkpoint(tmp_path, make_iterator, state_type):
    mesh = tr.make_data_mesh()
    iterator = make_iterator()
    for _ in range(3):
        next(iterator)
    assert isinstance(iterator.get_state(), state_type)
    checkpointer = tr.Checkpointer(str(tmp_path), async_save=False)
    assert checkpointer.save(make_state(mesh, step=3), iterator)
    expected = [np.asarray(next(iterator)) for _ in range(5)]
    checkpointer.close()

    fresh = make_iterator()
    checkpointer = tr.Checkpointer(str(tmp_path))
    state = checkpointer.restore(abstract(mesh), fresh)
    checkpointer.close()
    assert int(state.step) == 3
    got = [np.asarray(next(fresh)) for _ in range(5)]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    files = os.listdir(tmp_path / "checkpoints" / "3" / "data_iterator")
    assert "process_0-of-1.json" in files


def test_restore_onto_another_mesh_places_arrays_there(tmp_path):
    mesh8, mesh1 = tr.make_data_mesh(), tr.make_data_mesh(jax.devices()[:1])
    saved = make_state(mesh8, step=7)
    checkpointer = tr.Checkpointer(str(tmp_path))
    checkpointer.save(saved, dataset_iterator())
    checkpointer.close()
    checkpointer = tr.Checkpointer(str(tmp_path))
    restored = checkpointer.restore(abstract(mesh1))
    checkpointer.close()
    assert restored.params["w"].sharding.mesh.devices.size == 1
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(saved.params["w"]))
    np.testing.assert_array_equal(np.asarray(restored.rng), np.asarray(saved.rng))
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)


def test_save_twice_at_one_step_is_a_no_op_and_missing_checkpoint_is_clear(tmp_path):
    mesh = tr.make_data_mesh()
    checkpointer = tr.Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpointer.restore(abstract(mesh))
    assert checkpointer.save(make_state(mesh, 2), dataset_iterator())
    assert not checkpointer.save(make_state(mesh, 2), dataset_iterator())
    assert checkpointer.all_steps() == [2]
    checkpointer.close()


def test_iterator_state_of_another_process_count_is_reported(tmp_path):
    mesh = tr.make_data_mesh()
    checkpointer = tr.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(make_state(mesh, 1), dataset_iterator())
    checkpointer.close()
    folder = tmp_path / "checkpoints" / "1" / "data_iterator"
    os.rename(folder / "process_0-of-1.json", folder / "process_0-of-2.json")
    with pytest.raises(FileNotFoundError, match="different number of processes"):
        tr.Checkpointer(str(tmp_path)).restore(abstract(mesh), dataset_iterator())


def test_iterator_state_encoding(tmp_path):
    from tfx_jax.train.checkpoint import decode_iterator_state, encode_iterator_state
    for state in ({"next_index": 3}, b"\x00\xffraw", [1, 2]):
        assert decode_iterator_state(encode_iterator_state(state)) == state
    with pytest.raises(ValueError, match="unknown data iterator state format"):
        decode_iterator_state({"format": "pickle"})
    checkpointer = tr.Checkpointer(str(tmp_path))
    with pytest.raises(TypeError, match="must have get_state"):
        checkpointer.save(make_state(tr.make_data_mesh()), iter([1]))
    checkpointer.close()


def test_restore_params_reads_only_the_parameters_and_names_problems(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no trained model in workdir"):
        tr.restore_params(workdir, init_params)
    saved = make_state(tr.make_data_mesh(), step=5)
    checkpointer = tr.Checkpointer(workdir, async_save=False)
    checkpointer.save(saved, dataset_iterator())
    checkpointer.close()
    mesh1 = tr.make_data_mesh(jax.devices()[:1])
    params = tr.restore_params(workdir, init_params, mesh=mesh1)  # no optimizer needed
    assert set(params) == {"w", "b"} and params["w"].sharding.mesh.devices.size == 1
    np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(saved.params["w"]))

    def wider(rng):
        return {"w": jax.random.normal(rng, (4, 5)), "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"params/w: checkpoint has shape \(4, 3\), model "
                                         r"expects \(4, 5\)"):
        tr.restore_params(workdir, wider)


def test_config_round_trips_through_the_workdir(tmp_path):
    config = tr.default_config()
    config.model = {"d_model": 8, "shape": (8, 8, 1)}
    with pytest.raises(FileNotFoundError, match="config.json"):
        tr.load_config(str(tmp_path))
    tr.save_config(config, str(tmp_path))
    loaded = tr.load_config(str(tmp_path))
    assert loaded.batch_size == config.batch_size and loaded.model.d_model == 8
    assert list(loaded.model.shape) == [8, 8, 1]
