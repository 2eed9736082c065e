"""Tiny Transformer / CausalLM tasks and checkpointable batch streams for the sharding tests.

Sizes divide by every mesh axis the tests use (8 devices): d_model 32, 4 heads,
d_ff 64, vocab 64. Batches are a pure function of the step, so any two runs
see the same data.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import tfx_jax as tfx
from tfx_jax import train as tr

LENGTH = 8
VOCAB = 64
TINY = dict(d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)


def lm_model(**overrides) -> tfx.CausalLM:
    options = dict(vocab_size=VOCAB, num_layers=1, max_len=LENGTH, tie_embeddings=False,
                   scan_layers=True, **TINY)
    return tfx.CausalLM(tfx.CausalLMConfig(**{**options, **overrides}))


def transformer_model(**overrides) -> tfx.Transformer:
    options = dict(vocab_size=VOCAB, num_encoder_layers=1, num_decoder_layers=1,
                   max_len=LENGTH, share_embeddings=False, **TINY)
    return tfx.Transformer(tfx.TransformerConfig(**{**options, **overrides}))


def make_task(kind: str = "lm", **overrides) -> tr.Task:
    """A token task: the LM predicts the next token, the Transformer copies its source."""
    if kind == "lm":
        model = lm_model(**overrides)

        def init_params(rng):
            return model.init({"params": rng}, jnp.ones((1, LENGTH), jnp.int32))["params"]

        def logits_of(params, batch, train, rng):
            return model.apply({"params": params}, batch["inputs"], deterministic=not train,
                               rngs={"dropout": rng})
    else:
        model = transformer_model(**overrides)

        def init_params(rng):
            dummy = jnp.ones((1, LENGTH), jnp.int32)
            return model.init({"params": rng}, dummy, dummy)["params"]

        def logits_of(params, batch, train, rng):
            return model.apply({"params": params}, batch["inputs"], batch["targets_in"],
                               deterministic=not train, rngs={"dropout": rng})

    def loss_fn(params, batch, rng, train):
        logits = logits_of(params, batch, train, rng)
        loss, num_tokens = tr.token_cross_entropy(logits, batch["targets"])
        return loss, {"weight": num_tokens}

    return tr.Task(init_params=init_params, loss_fn=loss_fn)


def make_batch(step: int, batch_size: int) -> dict:
    rng = np.random.default_rng(step)
    inputs = rng.integers(1, VOCAB, size=(batch_size, LENGTH)).astype(np.int32)
    return {"inputs": inputs, "targets_in": np.roll(inputs, 1, axis=1),
            "targets": np.roll(inputs, -1, axis=1)}


class Batches:
    """An infinite, checkpointable stream: batch i is ``make_batch(i)``."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.index += 1
        return make_batch(self.index, self.batch_size)

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def train_config(num_train_steps: int, batch_size: int = 8, **mesh):
    """A ``tr.train`` config for these tasks: constant lr 1e-2, a metrics line every step."""
    config = tr.default_config()
    config.batch_size, config.num_train_steps = batch_size, num_train_steps
    config.learning_rate, config.schedule, config.warmup_steps = 1e-2, "constant", 0
    config.log_every_steps, config.eval_every_steps = 1, 0
    config.checkpoint_every_steps, config.async_checkpointing = 0, False
    config.progress_bar = False
    config.mesh.update(mesh)
    return config


def train_losses(workdir) -> list[tuple[int, float]]:
    """(step, loss) of every training metrics line ``tr.train`` wrote in ``workdir``."""
    return [(r["step"], r["loss"]) for r in tr.read_metrics(str(workdir), "train")]
