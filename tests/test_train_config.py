"""Config defaults and validation, mesh helpers, metric averaging and the metrics file."""
import json
import pathlib

import jax
import numpy as np
import pytest

from tests.scripts import experiment_config
from tfx_jax import train as tr
from tfx_jax.apps.translation import experiment as translation


def test_default_config_is_valid_and_follows_the_paper():
    config = tr.default_config()
    tr.validate_config(config)
    assert (config.b1, config.b2, config.eps) == (0.9, 0.98, 1e-9)
    assert config.warmup_steps == 4000 and config.skip_nonfinite_updates is False


@pytest.mark.parametrize("key,value,message", [
    ("num_train_steps", -5, "config.num_train_steps must be a positive integer, got -5"),
    ("batch_size", 0, "config.batch_size must be a positive integer"),
    ("log_every_steps", 0, "config.log_every_steps must be a positive integer"),
    ("checkpoint_every_steps", -1, "config.checkpoint_every_steps must be a non-negative"),
    ("schedule", "linear", "config.schedule must be one of"),
    ("optimizer", "sgd", "config.optimizer must be one of"),
    ("b2", 1.0, r"config.b2 must be in \[0, 1\)"),
    ("learning_rate", 0.0, "config.learning_rate must be a positive number"),
    ("grad_clip_norm", -1.0, "config.grad_clip_norm must be a non-negative number"),
    ("weight_decay", 0.1, "needs config.optimizer = 'adamw'"),
    ("grad_accum_steps", 3, "config.num_train_steps must be a multiple of "
                            "config.grad_accum_steps = 3"),
    ("warmup_steps", 200_000, "config.warmup_steps must be smaller than the number of "
                              "optimizer updates"),
])
def test_invalid_values_are_named(key, value, message):
    config = tr.default_config()
    config[key] = value
    with pytest.raises(ValueError, match=message):
        tr.validate_config(config)


def test_missing_training_keys_are_listed():
    config = tr.default_config()
    del config["seed"]
    with pytest.raises(ValueError, match=r"missing the training keys \['seed'\]"):
        tr.validate_config(config)


EXPERIMENT_CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent /
                                            "experiments" / "configs").glob("*.py"))


@pytest.mark.parametrize("name", EXPERIMENT_CONFIGS)
def test_experiment_configs_extend_the_defaults(name):
    defaults = tr.default_config()
    config = experiment_config(name)
    missing = sorted(set(defaults) - set(config))
    assert not missing, f"experiments/configs/{name}.py drops training keys {missing}"
    assert "model" in set(config) - set(defaults)  # plus the experiment's own keys
    if name == "translate":  # 0 / None = decided by the data (apps/translation/experiment.py)
        assert config.num_train_steps == 0 and config.num_epochs == 0
        assert config.batch_size is None and config.model_size == "auto"
        sizes = translation.decide_sizes(config, 0, user_corpus=False)[0]  # number_words
        config = tr.freeze(config, translation.JOB, **sizes).as_configdict()
        config.num_train_steps = 600
    tr.validate_config(config)  # which the loop ignores
    config.batch_size = 0  # while it still checks the training keys
    with pytest.raises(ValueError, match="config.batch_size must be a positive integer"):
        tr.validate_config(config)


def test_check_batch_size_names_key_and_device_count():
    mesh = tr.make_data_mesh()
    assert mesh.devices.shape == (8, 1, 1) and mesh.axis_names == ("data", "fsdp", "tensor")
    tr.check_batch_size(64, mesh)
    with pytest.raises(ValueError, match=r"config.batch_size = 20 must be divisible by the "
                                         r"number of devices in the mesh \(8\)"):
        tr.check_batch_size(20, mesh)


def test_shard_batch_splits_leading_dim_over_devices():
    mesh = tr.make_data_mesh()
    batch = {"x": np.arange(16 * 3).reshape(16, 3), "y": np.arange(16)}
    sharded = tr.shard_batch(batch, mesh)
    assert sharded["x"].shape == (16, 3)
    assert sharded["x"].sharding == tr.batch_sharding(mesh)
    shards = sorted(sharded["y"].addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape for s in shards] == [(2,)] * 8
    np.testing.assert_array_equal(np.asarray(shards[3].data), [6, 7])
    np.testing.assert_array_equal(np.asarray(sharded["x"]), batch["x"])
    with pytest.raises(ValueError, match=r"batch\['y'\] has shape \(12,\)"):
        tr.shard_batch({"y": np.arange(12)}, mesh)


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    tr.initialize_distributed()
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()


def test_average_metrics_weights_by_weight_key():
    per_batch = [{"loss": 1.0, "weight": 3.0}, {"loss": 3.0, "weight": 1.0}]
    assert tr.average_metrics(per_batch) == {"loss": 1.5, "weight": 4.0}
    assert tr.average_metrics([{"loss": 1.0}, {"loss": 2.0}]) == {"loss": 1.5}


def test_metrics_writer_resume_drops_steps_after_checkpoint(tmp_path):
    lines = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "spl')  # torn last line
    writer = tr.MetricsWriter(str(tmp_path), start_step=2, tensorboard=False)
    writer.write(3, "train", {"loss": np.float32(0.25), "bad": float("nan")})
    writer.close()
    records = tr.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1] == {"step": 3, "split": "train", "loss": 0.25, "bad": None}


def test_metrics_writer_on_an_object_store_rewrites_the_file(tmp_path, monkeypatch):
    """gs:// cannot append (gcsfs silently overwrites): the writer rewrites the whole file."""
    from tfx_jax.train import metrics
    monkeypatch.setattr(metrics, "is_url", lambda path: True)  # a local stand-in for gs://
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    writer = tr.MetricsWriter(str(tmp_path), start_step=2, tensorboard=False)
    assert writer._file is None  # no open handle in append mode
    writer.write(3, "train", {"loss": 0.5})
    assert [r["step"] for r in tr.read_metrics(str(tmp_path))] == [1, 2, 3]
    writer.write(4, "eval", {"loss": 0.25})
    writer.close()
    records = tr.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.25)]
