"""Translation task pieces: teacher forcing, the loss, jit-compiled decoding, scores."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tfx_jax as tfx
from tfx_jax import train as tr
from tfx_jax.data import text_pipeline
from tfx_jax.data.tokenizer import BOS_ID, EOS_ID
from tfx_jax.apps.translation import (make_loss_fn, shift_right, transformer_config, translate,
                                 translate_eval_data, translate_texts, translation_scores)

VOCAB = 24
CONFIG = transformer_config(dict(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                                 num_decoder_layers=2, dropout_rate=0.0),
                            vocab_size=VOCAB, max_len=8)


@pytest.fixture(scope="module")
def params():
    src = jnp.ones((1, 6), jnp.int32)
    return jax.jit(tfx.Transformer(CONFIG).init)(jax.random.key(3), src, src)["params"]


def test_shift_right_starts_with_bos_and_drops_the_last_token():
    targets = np.array([[5, 6, 7, EOS_ID, 0], [8, EOS_ID, 0, 0, 0]], np.int32)
    expected = np.array([[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID, 0, 0]], np.int32)
    np.testing.assert_array_equal(shift_right(jnp.asarray(targets)), expected)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        shift_right(jnp.zeros((5,), jnp.int32))


def test_loss_is_teacher_forced_on_the_shifted_targets(params):
    rng = np.random.default_rng(0)
    inputs = rng.integers(4, VOCAB, (3, 6)).astype(np.int32)
    targets = rng.integers(4, VOCAB, (3, 5)).astype(np.int32)
    targets[0, 3:] = [EOS_ID, 0]
    decoder_in = np.concatenate([np.full((3, 1), BOS_ID), targets[:, :-1]], 1).astype(np.int32)
    logits = np.asarray(jax.jit(tfx.Transformer(CONFIG).apply)({"params": params}, inputs,
                                                               decoder_in), np.float64)
    # float64 reference: label-smoothed cross-entropy over the non-pad target tokens
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    smoothed = np.full(logits.shape, 0.1 / VOCAB)
    np.put_along_axis(smoothed, targets[..., None], 0.9 + 0.1 / VOCAB, axis=-1)
    per_token = -(smoothed * log_probs).sum(-1)
    real = targets != 0
    loss_fn = jax.jit(make_loss_fn(CONFIG, label_smoothing=0.1), static_argnums=3)
    loss, metrics = loss_fn(params, {"inputs": inputs, "targets": targets}, jax.random.key(0),
                            False)
    np.testing.assert_allclose(float(loss), per_token[real].mean(), rtol=1e-5)
    assert float(metrics["weight"]) == real.sum()


def _full_pass_greedy(params, sources, length):
    """Independent greedy decoder: one uncached full forward pass per new token.

    The decoder input is right-padded to a fixed length (one compilation); by
    causality the logits at position t see only positions 0..t.
    """
    forward = jax.jit(tfx.Transformer(CONFIG).apply)
    decoder_in = np.zeros((sources.shape[0], length), np.int32)
    decoder_in[:, 0] = BOS_ID
    out = np.zeros_like(decoder_in)
    for t in range(length):
        out[:, t] = np.argmax(forward({"params": params}, sources, decoder_in)[:, t], -1)
        if t + 1 < length:
            decoder_in[:, t + 1] = out[:, t]
    return out


def test_greedy_translate_matches_full_passes_and_pads_after_eos(params):
    sources = np.random.default_rng(1).integers(4, VOCAB, (4, 6)).astype(np.int32)
    sources[1, 3:] = [EOS_ID, 0, 0]
    got = np.asarray(translate(params, CONFIG, sources, max_length=6, beam_size=1))
    reference = _full_pass_greedy(params, sources, 6)
    assert got.shape == (4, 6)
    for row, ref in zip(got, reference):
        ref = list(ref)
        stop = ref.index(EOS_ID) + 1 if EOS_ID in ref else len(ref)
        np.testing.assert_array_equal(row[:stop], ref[:stop])
        np.testing.assert_array_equal(row[stop:], 0)


def test_beam_translate_shape_and_eos_padding(params):
    sources = np.random.default_rng(2).integers(4, VOCAB, (3, 6)).astype(np.int32)
    got = np.asarray(translate(params, CONFIG, sources, max_length=7, beam_size=3, alpha=0.6))
    assert got.shape == (3, 7) and got.dtype == np.int32
    for row in got:
        row = list(row)
        if EOS_ID in row:
            assert all(t == 0 for t in row[row.index(EOS_ID) + 1:])
    with pytest.raises(ValueError, match="exceeds the model's max_len=8"):
        translate(params, CONFIG, sources, max_length=9, beam_size=1)


class DigitTokenizer:
    """Independent stand-in: one id per character ('a' -> 4, ...)."""

    def encode(self, text):
        return [ord(c) - ord("a") + 4 for c in text]

    def decode(self, ids):
        ids = list(np.asarray(ids))
        ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
        return "".join(chr(t - 4 + ord("a")) for t in ids if t > 3)


def test_eval_data_translations_line_up_with_references_on_8_devices(params):
    """Sharded decoding + gather must give source i's translation at position i."""
    rng = np.random.default_rng(4)
    pairs = [("".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 6))), "x")
             for _ in range(21)]
    tokenizer = DigitTokenizer()
    mesh = tr.make_data_mesh()
    assert mesh.devices.size == 8
    data = text_pipeline.eval_batches(pairs, tokenizer, global_batch_size=16,
                                      max_source_length=6, max_target_length=5)
    hypotheses = translate_eval_data(params, CONFIG, data, tokenizer, mesh, max_length=5)
    assert len(hypotheses) == 21 and len(set(hypotheses)) > 1
    # Unsharded, in batches of 8 (the last one padded): the same translation per source.
    assert translate_texts(params, CONFIG, tokenizer, data.sources, max_source_length=6,
                           max_length=5, beam_size=1, batch_size=8) == hypotheses


def test_translation_scores():
    hypotheses = ["the cat sat on the mat", "a b", "einundzwanzig"]
    references = ["the cat sat on the mat", "a c", "einundzwanzig"]
    scores = translation_scores(hypotheses, references)
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert 0 < scores["bleu"] < 100
    assert translation_scores(references, references)["bleu"] == pytest.approx(100.0)
    # One-word sentences have no word 4-grams; character n-grams score them.
    words = ["einundzwanzig", "dreihundert"]
    assert translation_scores(words, words)["bleu"] == 0.0
    assert translation_scores(words, words, bleu_tokenize="char")["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses for 3 references"):
        translation_scores(hypotheses[:2], references)


def test_transformer_config_rejects_derived_and_unknown_keys():
    with pytest.raises(ValueError, match="config.model.vocab_size is derived"):
        transformer_config(dict(vocab_size=5), vocab_size=10, max_len=8)
    with pytest.raises(ValueError, match="does not know"):
        transformer_config(dict(d_modl=16), vocab_size=10, max_len=8)
