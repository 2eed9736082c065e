"""Sampling text from a trained LM with the key/value cache: all prompts in one batch.

Nucleus (top-p) sampling (Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration", sec. 3.1): draw from the smallest set of most likely tokens
whose probability sums to at least ``p``, renormalised. The filters apply in
the usual order: logits / temperature, then top-k, then top-p on what top-k
kept (renormalised), then a draw (:func:`tfx_jax.decoding.top_k_top_p_mask`,
used by :func:`tfx_jax.decoding.sample`). ``temperature=0`` is greedy decoding.

Every prompt (``num_samples`` rows each) is decoded in one batch and one
compiled call: the ``[BOS] + ids`` prompts are left-padded
(:func:`tfx_jax.decoding.left_pad`: padding is segment 0, each prompt's
positions start at 0), go through the decode-mode :class:`CausalLM` in one call
(the prefill, filling the caches), then one token per step for all rows. A row
therefore computes what its prompt computes alone. Left padding takes cache
slots but no positions, so the cache holds ``longest prompt + steps`` slots
(more than ``max_len`` when prompts differ in length) and each row is cut at
its own limit: EOS, ``num_tokens``, or the end of its context (``max_len``
positions); what a row computes past that is discarded.

Each row draws with its own random key, ``fold_in(fold_in(key(seed),
crc32(prompt ids)), sample index)``: a sample depends on the seed, its prompt
and its number only, never on the other prompts of the batch.
"""
from __future__ import annotations

import functools
import zlib
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax.errors import ConfigError, DataError
from tfx_jax import decoding
from tfx_jax.apps.language_model.pipeline import special_ids
from tfx_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from tfx_jax.lm import CausalLM


def _decode_cache(model: CausalLM, batch: int, length: int) -> Any:
    """An empty key/value cache of ``length`` slots for ``batch`` rows.

    ``length`` may exceed the model's ``max_len`` (left padding uses slots, not
    positions); the cache is shaped by a decode-mode twin with a longer
    context, whose parameters are never used (dead code under jit).
    """
    config = model.config.replace(decode=True, max_len=max(length, model.config.max_len))
    return CausalLM(config).init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32))[
        "cache"]


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "temperature", "top_k",
                                             "top_p", "eos_id"))
def sample_continuations(model: CausalLM, params: Any, tokens: jax.Array, positions: jax.Array,
                         segment_ids: jax.Array, rngs: jax.Array, *, num_steps: int,
                         temperature: float = 1.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None,
                         eos_id: Union[int, tuple, None] = EOS_ID) -> jax.Array:
    """Left-padded prompts ``tokens`` [N, L] (with their ``positions`` / ``segment_ids``
    from :func:`tfx_jax.decoding.left_pad`) continued by ``num_steps`` tokens: [N, L + steps].

    ``model`` is the training-mode LM (its decode-mode twin shares the
    parameters); ``rngs`` one key per row. After EOS a row repeats EOS.
    """
    decoder = CausalLM(model.config.replace(decode=True))
    cache = _decode_cache(model, tokens.shape[0], tokens.shape[1] + max(num_steps - 1, 0))

    def step_fn(step_tokens, cache, **kwargs):
        logits, mutated = decoder.apply({"params": params, "cache": cache}, step_tokens,
                                        mutable=["cache"], **kwargs)
        return logits, mutated["cache"]

    return decoding.sample(step_fn, cache, tokens, num_steps, rng=rngs, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_id=eos_id,
                           prompt_kwargs=dict(positions=positions, segment_ids=segment_ids))


def prompt_ids(text: str, tokenizer, max_len: int, *, number: Optional[int] = None,
               bos_id: Optional[int] = BOS_ID) -> np.ndarray:
    """``[BOS] + ids`` of a prompt (no BOS if ``bos_id`` is None); ValueError when it leaves
    no room in the context."""
    ids = np.asarray([*([] if bos_id is None else [bos_id]), *tokenizer.encode(text)], np.int32)
    if len(ids) >= max_len:
        which = f"prompt {number} " if number is not None else "prompt "
        raise DataError(f"{which}{text[:40]!r}{'...' if len(text) > 40 else ''} is "
                         f"{len(ids)} tokens with BOS, longer than the model's context allows "
                         f"(max_len={max_len} tokens, at least one of them generated); "
                         f"shorten the prompt")
    return ids


def row_keys(seed: int, prompts: Sequence[np.ndarray], num_samples: int) -> jax.Array:
    """One key per (prompt, sample) row, prompt-major: from the seed, the prompt's ids and
    the sample's number only."""
    digests = np.repeat([zlib.crc32(np.asarray(p, np.int32).tobytes()) for p in prompts],
                        num_samples).astype(np.uint32)
    samples = np.tile(np.arange(num_samples, dtype=np.uint32), len(prompts))
    base = jax.random.key(seed)
    return jax.vmap(lambda d, s: jax.random.fold_in(jax.random.fold_in(base, d), s))(
        jnp.asarray(digests), jnp.asarray(samples))


def generate_ids(model: CausalLM, params: Any, prompts: Sequence[Sequence[int]], *,
                 num_tokens: int, num_samples: int = 1, seed: int = 0,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_id: Union[int, tuple, None] = EOS_ID,
                 pad_id: int = PAD_ID) -> list[list[np.ndarray]]:
    """The generated ids (EOS and what follows cut off) of ``num_samples`` rows per prompt.

    ``prompts``: token ids, each starting with BOS and shorter than ``max_len``.
    A row stops at EOS (``eos_id``: one id, or a tuple of them), after ``num_tokens``
    tokens, or where its context (``max_len`` positions) is full. One batch, one
    compiled call.
    """
    decoding.check_sampling_options(temperature, top_k, top_p)
    if num_tokens < 1 or num_samples < 1:
        raise ConfigError(f"num_tokens and num_samples must be >= 1, got {num_tokens} and "
                         f"{num_samples}")
    max_len = model.config.max_len
    prompts = [np.asarray(p, np.int32) for p in prompts]
    if not prompts:
        raise DataError("no prompts to continue")
    too_long = [i for i, p in enumerate(prompts) if len(p) >= max_len]
    if too_long:
        raise DataError(f"prompt {too_long[0] + 1} has {len(prompts[too_long[0]])} tokens; "
                         f"max_len={max_len} leaves room for at most {max_len - 1}")
    for number, p in enumerate(prompts, 1):
        decoding.check_token_ids(p, model.config.vocab_size, f"prompt {number}")
    budgets = [min(num_tokens, max_len - len(p)) for p in prompts]
    rows = [p for p in prompts for _ in range(num_samples)]
    tokens, positions, segment_ids = decoding.left_pad(rows, pad_id=pad_id)
    padded = tokens.shape[1]
    run = decoding.checked(functools.partial(  # checked mode: cache overflow, ids under jit
        sample_continuations, model, num_steps=max(budgets), temperature=float(temperature),
        top_k=top_k, top_p=None if top_p is None else float(top_p), eos_id=eos_id))
    sequences = np.asarray(run(params, tokens, positions, segment_ids,
                               row_keys(seed, prompts, num_samples)))
    outputs = []
    for index, budget in enumerate(budgets):
        samples = []
        for row in sequences[index * num_samples:(index + 1) * num_samples]:
            generated = row[padded:padded + budget]
            eos = (np.flatnonzero(np.isin(generated, eos_id)) if eos_id is not None else [])
            samples.append(generated[:eos[0]] if len(eos) else generated)
        outputs.append(samples)
    return outputs


def generate_texts(model: CausalLM, params: Any, tokenizer, prompts: Sequence[str], *,
                   num_tokens: int, num_samples: int = 1, seed: int = 0,
                   temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> list[list[str]]:
    """``num_samples`` continuations (the prompt's text, then the generated text) of each prompt.

    See :func:`generate_ids`. All prompts are checked (length, sampling
    options) before any decoding. A tokenizer with ``bos_id`` / ``eos_id`` /
    ``pad_id`` attributes (a checkpoint's, ``pretrained.load_tokenizer``) brings
    its own special ids (and ``eos_ids``: a row stops at any of them); otherwise
    the project tokenizer's are used.
    """
    bos_id, eos_id, pad_id = special_ids(tokenizer)  # padding is masked
    eos_id = tuple(getattr(tokenizer, "eos_ids", ())) or eos_id  # all of a checkpoint's
    decoding.check_sampling_options(temperature, top_k, top_p)
    if not prompts:
        raise DataError("no prompts to continue")
    max_len = model.config.max_len
    encoded = [prompt_ids(text, tokenizer, max_len, number=i + 1 if len(prompts) > 1 else None,
                          bos_id=bos_id) for i, text in enumerate(prompts)]
    generated = generate_ids(model, params, encoded, num_tokens=num_tokens,
                             num_samples=num_samples, seed=seed, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
    start = 0 if bos_id is None else 1
    return [[tokenizer.decode(np.concatenate([ids[start:], row])) for row in rows]
            for ids, rows in zip(encoded, generated)]
