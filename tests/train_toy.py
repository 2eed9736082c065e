"""A toy task for the training-library tests: a tiny token model on Grain data.

The model maps each input token to logits over the vocabulary (embedding,
dropout, dense), the target is ``(input + 1) mod vocab`` with padded tails,
so the label-smoothed token loss and dropout keys are exercised. The data is
a real Grain pipeline (``MapDataset`` -> ``to_iter_dataset``), so its iterator
state goes through the checkpoints exactly as the experiments' pipelines do.
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

from tfx_jax import train as tr
from tfx_jax.logical_axes import with_axes

VOCAB = 11
LENGTH = 6
NUM_EXAMPLES = 64


class ToyTokenModel(nn.Module):
    """Its weights carry logical axis names, so ``config.mesh.fsdp`` splits them."""

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool):
        x = nn.Embed(VOCAB, 8, embedding_init=with_axes(nn.linear.default_embed_init,
                                                        ("vocab", "embed")))(tokens)
        x = nn.Dropout(0.1)(x, deterministic=deterministic)
        return nn.Dense(VOCAB, kernel_init=with_axes(nn.linear.default_kernel_init,
                                                     ("embed", "vocab")))(x)


def _examples(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(NUM_EXAMPLES):
        inputs = rng.integers(1, VOCAB, size=LENGTH).astype(np.int32)
        length = int(rng.integers(2, LENGTH + 1))
        inputs[length:] = 0
        targets = np.where(inputs > 0, inputs % (VOCAB - 1) + 1, 0).astype(np.int32)
        records.append({"inputs": inputs, "targets": targets, "scale": np.float32(1.0)})
    return records


def make_train_iter(batch_size: int, *, seed: int = 0, nan_at_step: int | None = None,
                    seconds_per_batch: float = 0.0, process_index: int | None = None,
                    process_count: int | None = None):
    """An infinite, checkpointable Grain iterator of process-local batches.

    ``nan_at_step=k`` makes batch k (1-based: the batch of train step k) carry
    ``scale = NaN``, which the toy loss multiplies in. Each process reads the
    examples ``process_index::process_count`` (default: this process's place
    in the JAX runtime); passing them lets one process build another's shard.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = batch_size // process_count

    def poison_and_pace(index, batch):
        if seconds_per_batch:
            time.sleep(seconds_per_batch)
        if nan_at_step is not None and index + 1 == nan_at_step:
            batch = dict(batch, scale=np.full_like(batch["scale"], np.nan))
        return batch

    dataset = (grain.MapDataset.source(_examples())
               .slice(slice(process_index, None, process_count))
               .shuffle(seed=seed).repeat().batch(local, drop_remainder=True)
               .map_with_index(poison_and_pace))
    return iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))


def make_eval_batches(batch_size: int, *, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
    """One finite pass per ``iter()`` (re-iterable), as the data layer's eval sets are.

    ``batch_size`` is the global batch; process ``i`` of ``n`` gets the examples
    ``i::n`` in batches of ``batch_size // n``.
    """
    return (grain.MapDataset.source(_examples(seed=1))
            .slice(slice(process_index, None, process_count))
            .batch(batch_size // process_count, drop_remainder=True))


def make_task(length_scale: int = 1) -> tr.Task:
    """The toy task; ``length_scale`` != 1 changes the parameter shapes (mismatch tests)."""
    model = ToyTokenModel()
    if length_scale != 1:
        model = _WideToyModel(width=8 * length_scale)

    def init_params(rng):
        return model.init({"params": rng}, np.zeros((1, LENGTH), np.int32),
                          deterministic=True)["params"]

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["inputs"], deterministic=not train,
                             rngs={"dropout": rng})
        loss, num_tokens = tr.token_cross_entropy(logits, batch["targets"], label_smoothing=0.1)
        accuracy, _ = tr.token_accuracy(logits, batch["targets"])
        loss = loss * batch["scale"].mean()
        return loss, {"accuracy": accuracy, "weight": num_tokens}

    return tr.Task(init_params=init_params, loss_fn=loss_fn)


class _WideToyModel(nn.Module):
    width: int

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool):
        x = nn.Embed(VOCAB, self.width, name="Embed_0")(tokens)
        x = nn.Dropout(0.1)(x, deterministic=deterministic)
        return nn.Dense(VOCAB, name="Dense_0")(x)


def use_compilation_cache(directory) -> None:
    """Lets the many short runs of the tests reuse compiled steps (JAX's persistent cache).

    Every ``train()`` call builds a new jitted step, so without it each run
    recompiles the same program; compilation dominates these tiny runs. Under
    pytest the session's cache (tests/conftest.py) is used instead of ``directory``:
    JAX opens one cache directory per process, the first one set before a compile.
    """
    directory = os.environ.get("TFX_JAX_TEST_COMPILATION_CACHE") or directory
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def toy_config(**overrides) -> ml_collections.ConfigDict:
    config = tr.default_config()
    config.batch_size = 16
    config.num_train_steps = 12
    config.learning_rate = 0.05
    config.schedule = "constant"
    config.warmup_steps = 0
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 4
    config.max_checkpoints_to_keep = 5
    config.progress_bar = False
    config.update(overrides)
    return config
