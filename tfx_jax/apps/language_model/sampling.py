"""Sampling text from a trained LM with the key/value cache: temperature, top-k, top-p.

Nucleus (top-p) sampling (Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration", sec. 3.1): draw from the smallest set of most likely tokens
whose probability sums to at least ``p``, renormalised. The filters apply in
the usual order: logits / temperature, then top-k, then top-p on what top-k
kept (renormalised), then a draw (:func:`tfx_jax.decoding.top_k_top_p_mask`,
used by :func:`tfx_jax.decoding.sample`). ``temperature=0`` is greedy decoding.

The prompt ``[BOS] + ids`` goes through the decode-mode :class:`CausalLM` in one
call (filling the caches), then one token per step
(:func:`tfx_jax.decoding.sample`), until EOS or the requested number of tokens.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax import decoding
from tfx_jax.data.tokenizer import BOS_ID, EOS_ID
from tfx_jax.lm import CausalLM


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "temperature", "top_k",
                                             "top_p"))
def sample_continuations(model: CausalLM, params: Any, prompt: jax.Array, rng: jax.Array, *,
                         num_steps: int, temperature: float = 1.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None) -> jax.Array:
    """``prompt`` int32 [N, P] (starting with BOS) continued by ``num_steps`` tokens: [N, P+steps].

    ``model`` is the training-mode LM; its decode-mode twin shares the parameters.
    After EOS a row repeats EOS.
    """
    decoder = CausalLM(model.config.replace(decode=True))
    context = jnp.zeros((prompt.shape[0], model.config.max_len), jnp.int32)
    cache = decoder.init(jax.random.key(0), context)["cache"]

    def step_fn(tokens, cache):
        logits, mutated = decoder.apply({"params": params, "cache": cache}, tokens,
                                        mutable=["cache"])
        return logits, mutated["cache"]

    return decoding.sample(step_fn, cache, prompt, num_steps, rng=rng, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_id=EOS_ID)


def prompt_ids(text: str, tokenizer, max_len: int) -> np.ndarray:
    """``[BOS] + ids`` of a prompt; ValueError when it leaves no room in the context."""
    ids = np.asarray([BOS_ID, *tokenizer.encode(text)], np.int32)
    if len(ids) >= max_len:
        raise ValueError(f"prompt {text[:40]!r}{'...' if len(text) > 40 else ''} is "
                         f"{len(ids)} tokens with BOS, longer than the model's context allows "
                         f"(max_len={max_len} tokens, at least one of them generated); "
                         f"shorten the prompt")
    return ids


def generate_texts(model: CausalLM, params: Any, tokenizer, prompts: Sequence[str], *,
                   num_tokens: int, num_samples: int = 1, seed: int = 0,
                   temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> list[list[str]]:
    """``num_samples`` continuations (the prompt's text, then the generated text) of each prompt.

    Generation stops at EOS or after ``num_tokens`` tokens, or where the context
    (``max_len``) ends. Deterministic given ``seed``. All prompts are checked
    (length, sampling options) before any decoding.
    """
    decoding.check_sampling_options(temperature, top_k, top_p)
    if num_tokens < 1 or num_samples < 1:
        raise ValueError(f"num_tokens and num_samples must be >= 1, got {num_tokens} and "
                         f"{num_samples}")
    max_len = model.config.max_len
    encoded = [prompt_ids(text, tokenizer, max_len) for text in prompts]
    outputs = []
    for index, (text, ids) in enumerate(zip(prompts, encoded)):
        steps = min(num_tokens, max_len - len(ids))
        batch = jnp.asarray(np.repeat(ids[None], num_samples, axis=0))
        rng = jax.random.fold_in(jax.random.key(seed), index)
        sequences = np.asarray(sample_continuations(
            model, params, batch, rng, num_steps=steps, temperature=float(temperature),
            top_k=top_k, top_p=None if top_p is None else float(top_p)))
        outputs.append([tokenizer.decode(row) for row in sequences])  # drops BOS, stops at EOS
    return outputs
