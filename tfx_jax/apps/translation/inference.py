"""Translating with a trained encoder-decoder: encode once, then decode with a KV cache.

At inference there is no correct answer to feed the decoder. The source is
encoded once; the decoder starts from BOS and writes one token per step,
reading its own previous tokens from a key/value cache (``decode=True``), until
EOS. The paper decodes with beam search, beam size 4 and length penalty
alpha = 0.6 (sec. 6.1); ``beam_size=1`` is greedy decoding (the argmax at
every step), much cheaper and what evaluation during training uses.

:func:`translate` is one ``jax.jit`` program over a batch of sources; its
output has a fixed shape, ``[batch, max_length]`` token ids without BOS,
ending in EOS (1) and padded with 0 (like the targets of the input pipeline).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax import decoding
from tfx_jax.data.text_pipeline import token_row
from tfx_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from tfx_jax.transformer import Transformer, TransformerConfig


def _pad_after_eos(tokens: jax.Array) -> jax.Array:
    """Keeps each row up to its first EOS and sets what follows to padding."""
    is_eos = tokens == EOS_ID
    after_first_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    return jnp.where(after_first_eos, PAD_ID, tokens)


@functools.partial(jax.jit, static_argnames=("config", "max_length", "beam_size", "alpha"))
def translate(params, config: TransformerConfig, sources: jax.Array, *, max_length: int,
              beam_size: int = 4, alpha: float = 0.6) -> jax.Array:
    """Target token ids [batch, max_length] for source ids [batch, S] (0-padded).

    Args:
      params: the trained Transformer's parameters.
      config: its :class:`TransformerConfig` (``decode`` is set here).
      sources: int [batch, S], EOS-terminated and 0-padded like the training inputs.
      max_length: the most target tokens to write, EOS included (<= ``config.max_len``).
      beam_size: 1 for greedy decoding, else beam search with this many beams.
      alpha: GNMT length penalty ((5 + |Y|) / 6)^alpha of beam search.
    """
    if max_length > config.max_len:
        raise ValueError(f"max_length={max_length} exceeds the model's max_len={config.max_len}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    batch = sources.shape[0]
    encoded = Transformer(config.replace(decode=False)).apply(
        {"params": params}, sources, method=Transformer.encode)
    encoded = decoding.repeat_for_beams(encoded, beam_size)
    sources = decoding.repeat_for_beams(sources, beam_size)
    decoder = Transformer(config.replace(decode=True))
    # Initialising in decode mode shapes the (all-zero) caches for max_length tokens.
    cache = decoder.init(jax.random.key(0), encoded, sources,
                         jnp.zeros((batch * beam_size, max_length), jnp.int32),
                         method=Transformer.decode)["cache"]

    def step(tokens, cache):
        logits, mutated = decoder.apply({"params": params, "cache": cache}, encoded, sources,
                                        tokens, method=Transformer.decode, mutable=["cache"])
        return logits, mutated["cache"]

    if beam_size == 1:
        start = jnp.full((batch, 1), BOS_ID, jnp.int32)
        tokens = decoding.sample(step, cache, start, max_length, temperature=0.0,
                                 eos_id=EOS_ID)[:, 1:]
        return _pad_after_eos(tokens)
    sequences, _ = decoding.beam_search(step, cache, batch_size=batch, beam_size=beam_size,
                                        max_len=max_length, bos_id=BOS_ID, eos_id=EOS_ID,
                                        alpha=alpha)
    return sequences[:, 0]


def translate_texts(params, config: TransformerConfig, tokenizer, texts: Sequence[str], *,
                    max_source_length: int, max_length: int, beam_size: int = 4,
                    alpha: float = 0.6, batch_size: int = 64) -> list[str]:
    """Translates strings on this host, ``batch_size`` at a time (the last batch padded).

    Sources longer than ``max_source_length`` tokens (EOS included) are
    truncated as in training. Every batch has the same shape, so
    :func:`translate` compiles once.
    """
    texts = list(texts)
    batch_size = max(1, min(batch_size, len(texts)))
    outputs = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        rows = np.zeros((batch_size, max_source_length), np.int32)
        for i, text in enumerate(chunk):
            rows[i] = token_row(tokenizer.encode(text), max_source_length)
        decoding.check_token_ids(rows, config.vocab_size,
                                 f"inputs {start + 1}..{start + len(chunk)}")
        tokens = np.asarray(decoding.checked(functools.partial(  # checked mode (see decoding)
            translate, config=config, max_length=max_length, beam_size=beam_size,
            alpha=alpha))(params, sources=rows))
        outputs += [tokenizer.decode(row) for row in tokens[:len(chunk)]]
    return outputs
