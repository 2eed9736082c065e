"""Packing through the Tasks: packed rows give each example the loss it has alone, and no
token's loss depends on another example of its row (gradient check). Models are initialised
and differentiated under jit: eager Flax costs seconds per call on a loaded CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from tfx_jax.apps.language_model import pipeline
from tfx_jax.apps.language_model.task import make_loss_fn as lm_loss_fn
from tfx_jax.apps.translation.task import make_loss_fn as translation_loss_fn
from tfx_jax.data import text_pipeline
from tfx_jax.lm import CausalLM, CausalLMConfig
from tfx_jax.transformer import Transformer, TransformerConfig

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags

TINY = dict(d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0)
VARIANTS = [dict(position="learned"), dict(position="rope", num_kv_heads=1)]
RNG = jax.random.key(0)


class CharTokenizer:
    vocab_size = 32

    def encode(self, text):
        return [4 + (ord(c) - ord("a")) % 26 for c in text]


def _only_segment(batch, row, segment, keys=("targets",)):
    """Row ``row`` of a packed batch with the targets (and loss weights) of other segments
    set to padding."""
    out = {k: v[row:row + 1] for k, v in batch.items()}
    for key in (*keys, "weights"):
        if key in out:
            seg = out[key + "_segmentation"]
            out[key] = np.where(seg == segment, out[key], 0)
    return out


@pytest.mark.parametrize("overrides", VARIANTS)
def test_packed_lm_loss_of_each_text_equals_its_loss_alone(overrides):
    texts = ["abcde", "fgh", "ijklmn", "op", "qrstu", "vw"]
    max_len = 16
    model = CausalLM(CausalLMConfig(vocab_size=32, num_layers=1, max_len=max_len,
                                    **{**TINY, **overrides}))
    params = jax.jit(model.init)(RNG, jnp.ones((1, max_len), jnp.int32))["params"]
    loss_fn = jax.jit(lm_loss_fn(model), static_argnums=3)
    packed = next(pipeline.train_batches(texts, CharTokenizer(), global_batch_size=2,
                                         max_len=max_len, packing_enabled=True))
    checked = 0
    for row in range(2):
        for segment in range(1, packed["inputs_segmentation"][row].max() + 1):
            part = _only_segment(packed, row, segment)
            mask = packed["targets_segmentation"][row] == segment
            alone = {"inputs": pipeline._pad(packed["inputs"][row][mask], max_len)[None],
                     "targets": pipeline._pad(packed["targets"][row][mask], max_len)[None]}
            assert alone["inputs"][0, 0] == 2  # a whole example: it starts at BOS
            packed_loss, _ = loss_fn(params, part, RNG, False)
            alone_loss, _ = loss_fn(params, alone, RNG, False)
            np.testing.assert_allclose(packed_loss, alone_loss, rtol=1e-5)
            checked += 1
    assert checked > 2  # several texts per row


def test_no_lm_loss_depends_on_another_segment():
    """d loss(segment s) / d embedding rows of tokens only segment r uses is exactly 0 for
    r != s; without segment ids (one causal stream) the later segment does see the earlier."""
    max_len = 12
    model = CausalLM(CausalLMConfig(vocab_size=32, num_layers=1, max_len=max_len,
                                    tie_embeddings=False, **TINY))
    params = jax.jit(model.init)(RNG, jnp.ones((1, max_len), jnp.int32))["params"]
    # segment 1 uses tokens 4..8, segment 2 tokens 9..13 (no token in both)
    inputs = np.array([[2, 4, 5, 6, 7, 2, 9, 10, 11, 12, 13, 0]], np.int32)
    targets = np.array([[4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 1, 0]], np.int32)
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0]], np.int32)
    pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0]], np.int32)
    loss_fn = lm_loss_fn(model)
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, RNG, False)[0]))

    def embedding_grad(segment, packed=True):
        batch = {"inputs": inputs, "targets": np.where(seg == segment, targets, 0)}
        if packed:
            batch.update(inputs_segmentation=seg, inputs_position=pos,
                         targets_segmentation=seg, targets_position=pos)
        grads = grad_fn(params, batch)
        return np.abs(np.asarray(grads["embedding"]["embedding"])).sum(axis=1)

    first_rows, second_rows = [4, 5, 6, 7], [9, 10, 11, 12, 13]
    g1, g2 = embedding_grad(1), embedding_grad(2)
    assert (g1[second_rows] == 0).all() and (g1[first_rows] > 0).all()
    assert (g2[first_rows] == 0).all() and (g2[second_rows] > 0).all()
    assert (embedding_grad(2, packed=False)[first_rows] > 0).all()  # the check can fail


@pytest.mark.parametrize("overrides", VARIANTS)
def test_packed_translation_loss_of_each_pair_equals_its_loss_alone(overrides):
    pairs = [("ab", "xyz"), ("c", "q"), ("defg", "rs"), ("h", "tuvw"), ("ij", "k"),
             ("l", "mn")]
    cfg = TransformerConfig(vocab_size=32, num_encoder_layers=1, num_decoder_layers=1,
                            max_len=10, **{**TINY, **overrides})
    model = Transformer(cfg)
    params = jax.jit(model.init)(RNG, jnp.ones((1, 10), jnp.int32),
                                 jnp.ones((1, 10), jnp.int32))["params"]
    loss_fn = jax.jit(translation_loss_fn(cfg, label_smoothing=0.1), static_argnums=3)
    packed = next(text_pipeline.train_batches(pairs, CharTokenizer(), global_batch_size=2,
                                              max_source_length=10, max_target_length=10,
                                              packing=True))
    checked = 0
    for row in range(2):
        for segment in range(1, packed["targets_segmentation"][row].max() + 1):
            part = _only_segment(packed, row, segment)
            src = packed["inputs"][row][packed["inputs_segmentation"][row] == segment]
            tgt = packed["targets"][row][packed["targets_segmentation"][row] == segment]
            alone = {"inputs": np.pad(src, (0, 10 - len(src)))[None],
                     "targets": np.pad(tgt, (0, 10 - len(tgt)))[None]}
            packed_loss, _ = loss_fn(params, part, RNG, False)
            alone_loss, _ = loss_fn(params, alone, RNG, False)
            np.testing.assert_allclose(packed_loss, alone_loss, rtol=1e-5)
            checked += 1
    assert checked > 2
