"""Autoregressive decoding with a key/value cache: sampling, greedy and beam search.

At inference the decoder has no correct answer to read (no teacher forcing):
it writes one token, feeds it back, and writes the next. With a key/value cache
each new token costs one decoder step instead of a pass over the whole prefix.

Under ``jax.jit`` nothing traced can raise: a prompt that overflows the cache or
holds ids outside the vocabulary would give NaN logits silently. The checks are
therefore written twice: eagerly on concrete inputs (:func:`check_token_ids`,
:func:`check_cache_fits`: one error before any work), and as
``checkify.debug_check`` inside the traced code, which :func:`checked` turns into
an exception after the compiled call (the "checked mode"; without it they cost
nothing).

Everything here is model-agnostic. A model is seen through a *step function*

    step_fn(tokens [N, T] int32, cache) -> (logits [N, T, vocab], new_cache)

that appends ``T`` tokens to the cache (a prompt, or one token) and returns
next-token logits for each of them. Every cache leaf with at least one axis has
the sequence (batch * beam) on axis 0, so beams are reordered by one gather.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from tfx_jax.errors import DataError

StepFn = Callable[[jax.Array, Any], Tuple[jax.Array, Any]]
NEG_INF = -1.0e9


def cache_capacity(cache: Any) -> Optional[Tuple[int, Optional[int]]]:
    """(max_length, filled) of a tfx_jax key/value cache, or None if it has none.

    ``max_length`` is the number of positions the ``cached_key`` leaves hold;
    ``filled`` is the cache index when it is a concrete value (None under jit).
    """
    capacity, filled = None, None
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("['cached_key']") and getattr(leaf, "ndim", 0) >= 3:
            length = leaf.shape[leaf.ndim - 3]  # [batch, (layers,) length, kv_heads, head_dim]
            capacity = length if capacity is None else min(capacity, length)
        elif name.endswith("['cache_index']") and not isinstance(leaf, jax.core.Tracer):
            filled = max(filled or 0, int(np.max(np.asarray(leaf)))) if np.size(leaf) else filled
    return None if capacity is None else (capacity, filled)


def check_cache_fits(cache: Any, num_tokens: int, what: str) -> None:
    """Raises ValueError before decoding if ``num_tokens`` more tokens overflow the cache.

    Under jit the cache index is not known; the check then assumes a fresh
    (empty) cache, which is how the decoding functions are used.
    """
    found = cache_capacity(cache)
    if found is None:
        return
    capacity, filled = found
    filled = filled or 0
    if filled + num_tokens > capacity:
        raise ValueError(
            f"decode cache overflow: {what} feeds {num_tokens} tokens but the cache holds "
            f"max_length={capacity} positions ({filled} already filled); initialise the cache "
            f"with a [batch, max_length] sequence of at least {filled + num_tokens} tokens")


def check_token_ids(tokens: Any, vocab_size: int, what: str = "tokens") -> None:
    """Raises DataError when concrete ``tokens`` hold an id outside ``[0, vocab_size)``.

    Such an id reads outside the embedding table: NaN logits under jit, with no
    error. Traced values are left to the checked mode (:func:`checked`).
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    ids = np.asarray(tokens)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise DataError(
            f"{what}: token id {int(ids[bad].flat[0])} is outside the model's vocabulary "
            f"[0, {vocab_size}) (ids made by another tokenizer?)")


def _debug_check_ids(tokens: jax.Array, vocab_size: int, what: str) -> None:
    """The traced twin of :func:`check_token_ids` (raised by :func:`checked`)."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    checkify.debug_check(~jnp.any(bad), f"{what}: token id {{id}} is outside the model's "
                         f"vocabulary [0, {vocab_size})",
                         id=jnp.max(jnp.where(bad, tokens, -1)))


def checked(fn: Callable) -> Callable:
    """``fn`` (jitted or not) in checked mode: the decoding checks inside it raise.

    Cache overflow (:class:`tfx_jax.MultiHeadAttention`) and prompt ids outside the
    vocabulary (:func:`sample`) are ``checkify.debug_check`` calls; under
    ``checkify.checkify`` they become an error value that is thrown here, after
    the call, as ``checkify.JaxRuntimeError`` naming the problem. Bind static
    arguments first, e.g. ``checked(functools.partial(jitted_fn, model))(params, x)``.
    """
    checkified = checkify.checkify(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = checkified(*args, **kwargs)
        error.throw()
        return out
    return run


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
             length: Optional[int] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Left-pads prompts of different lengths into one batch for a causal LM.

    Returns int32 (tokens, positions, segment_ids), each [N, L] with L the longest
    prompt (or ``length``): padding first (segment 0, position 0), then the
    prompt's tokens (segment 1, positions 0 .. n-1). Every prompt then ends in
    the last column, so one cached decoding step continues all of them, and the
    model sees each prompt exactly as if it were alone. Pass positions and
    segment ids with the prompt (``sample(..., prompt_kwargs=...)``).
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("left_pad needs at least one prompt, got none")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"left_pad: prompt {empty[0]} is empty; every prompt needs a token")
    longest = max(map(len, prompts))
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"left_pad: length={length} is shorter than the longest prompt "
                         f"({longest} tokens)")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.zeros((len(prompts), length), np.int32)
    segment_ids = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[row, length - n:] = prompt
        positions[row, length - n:] = np.arange(n)
        segment_ids[row, length - n:] = 1
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)


def top_k_top_p_mask(logits: jax.Array, *, top_k: Optional[int] = None,
                     top_p: Optional[float] = None) -> jax.Array:
    """Bool mask [..., V] of the tokens top-k and then top-p keep (the argmax always stays).

    Top-k keeps the k most likely tokens. Top-p (nucleus sampling, Holtzman et al.
    2020) keeps token ``i`` when the probability of the tokens ranked above it
    (after top-k, renormalised) is below ``p``: the smallest prefix of the ranking
    whose mass reaches ``p``. Ties at a cut are all kept.
    """
    keep = jnp.ones(logits.shape, bool)
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = jax.lax.top_k(logits, top_k)[0][..., -1:]
        keep = logits >= kth_best
    if top_p is not None and top_p < 1.0:
        ranked = jnp.sort(jnp.where(keep, logits, -jnp.inf), axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ranked, axis=-1)
        in_nucleus = (jnp.cumsum(probs, axis=-1) - probs < top_p).at[..., 0].set(True)
        threshold = jnp.min(jnp.where(in_nucleus, ranked, jnp.inf), axis=-1, keepdims=True)
        keep = keep & (logits >= threshold)
    return keep


def check_sampling_options(temperature: float, top_k: Optional[int] = None,
                           top_p: Optional[float] = None) -> None:
    """Raises ValueError naming a bad temperature, top_k or top_p."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None (off), got {top_p!r}")


def _per_row(rng: jax.Array) -> bool:
    """Whether ``rng`` is one key per row ([N] typed keys or [N, 2] raw uint32 keys)."""
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return rng.ndim == (1 if typed else 2)


def _split(rng: jax.Array, num: int) -> jax.Array:
    """``num`` keys from ``rng`` on axis 0 (each row's keys from its own key when per row)."""
    if _per_row(rng):
        return jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, num))(rng), 0, 1)
    return jax.random.split(rng, num)


def _sample_logits(logits, rng, temperature, top_k, top_p):
    """Draws a token from logits [N, V]: argmax at temperature 0, else softmax(l / T)
    over the tokens top-k / top-p keep."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None or top_p is not None:
        keep = top_k_top_p_mask(logits, top_k=top_k, top_p=top_p)
        logits = jnp.where(keep, logits, NEG_INF)
    if _per_row(rng):
        return jax.vmap(jax.random.categorical)(rng, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def sample(step_fn: StepFn, cache: Any, prompt: jax.Array, num_steps: int, *,
           rng: Optional[jax.Array] = None, temperature: float = 1.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None,
           eos_id: Union[int, Sequence[int], None] = None,
           prompt_kwargs: Optional[dict] = None) -> jax.Array:
    """Continues ``prompt`` [N, P] by ``num_steps`` tokens; returns [N, P + num_steps].

    The prompt goes through the model in one call (filling the cache), then one
    token per step. ``temperature=0`` is greedy decoding; ``top_k`` keeps the k
    most likely tokens and ``top_p`` the nucleus before sampling (:func:`top_k_top_p_mask`).
    ``eos_id``: one id or several (Llama 3 ends with any of three); after one of them
    a sequence emits the first.
    ``prompt_kwargs`` are passed to the prompt's call only, ``step_fn(prompt, cache,
    **prompt_kwargs)`` (e.g. the positions and segment ids of :func:`left_pad`).
    ``rng`` is one key, or one key per row ([N] keys): then each row draws from
    its own key only, so its tokens do not depend on the other rows of the batch.
    A cache too short for P + num_steps - 1 tokens is refused before any work;
    prompt ids outside the vocabulary (the logits' last axis) raise DataError when
    the prompt is concrete, and in checked mode (:func:`checked`) under jit.
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must have shape [batch, length >= 1], got {tuple(prompt.shape)}")
    check_sampling_options(temperature, top_k, top_p)
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    check_cache_fits(cache, prompt.shape[1] + max(num_steps - 1, 0),
                     f"sample (prompt of {prompt.shape[1]} + {num_steps} steps - 1)")
    rng = jax.random.key(0) if rng is None else rng
    if _per_row(rng) and rng.shape[0] != prompt.shape[0]:
        raise ValueError(f"rng holds {rng.shape[0]} keys (one per row) for a batch of "
                         f"{prompt.shape[0]} rows")
    batch = prompt.shape[0]
    eos_ids = () if eos_id is None else tuple(np.atleast_1d(eos_id).tolist())
    eos_id = eos_ids[0] if eos_ids else None
    logits, cache = step_fn(prompt, cache, **(prompt_kwargs or {}))
    check_token_ids(prompt, logits.shape[-1], "the prompt")
    _debug_check_ids(prompt, logits.shape[-1], "the prompt")
    rng, first_rng = _split(rng, 2)
    token = _sample_logits(logits[:, -1], first_rng, temperature, top_k, top_p)
    done = jnp.zeros((batch,), bool)

    def body(carry, step_rng):
        token, done, cache = carry
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | jnp.isin(token, jnp.asarray(eos_ids, token.dtype))
        logits, cache = step_fn(token[:, None], cache)
        next_token = _sample_logits(logits[:, -1], step_rng, temperature, top_k, top_p)
        return (next_token, done, cache), token

    if num_steps > 1:
        (last, done, _), tokens = jax.lax.scan(body, (token, done, cache),
                                               _split(rng, num_steps - 1))
        if eos_id is not None:
            last = jnp.where(done, eos_id, last)
        generated = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    else:
        generated = token[:, None][:, :num_steps]
    return jnp.concatenate([prompt, generated.astype(prompt.dtype)], axis=1)


def repeat_for_beams(x: jax.Array, beam_size: int) -> jax.Array:
    """[B, ...] -> [B * beam_size, ...], each example repeated for its beams."""
    return jnp.repeat(x, beam_size, axis=0)


def gather_beams(tree: Any, origins: jax.Array) -> Any:
    """Reorders every [B * K, ...] leaf by ``origins`` [B, K] (beam indices within each example)."""
    batch, beam_size = origins.shape
    flat = (origins + jnp.arange(batch)[:, None] * beam_size).reshape(-1)

    def gather(leaf):
        if getattr(leaf, "ndim", 0) == 0 or leaf.shape[0] != batch * beam_size:
            return leaf
        return leaf[flat]
    return jax.tree.map(gather, tree)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT length normalisation ((5 + |Y|) / 6)^alpha (Wu et al. 2016), used by the paper."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(step_fn: StepFn, cache: Any, *, batch_size: int, beam_size: int = 4,
                max_len: int, bos_id: int, eos_id: int, alpha: float = 0.6
                ) -> Tuple[jax.Array, jax.Array]:
    """Beam search for the sequence with the highest length-normalised log-probability.

    The score of a finished hypothesis is log p(Y) / ((5 + |Y|) / 6)^alpha, |Y|
    counting its tokens including EOS (paper: beam 4, alpha 0.6). The cache must
    have been built for ``batch_size * beam_size`` sequences (see
    :func:`repeat_for_beams`). Search stops once no live beam can beat the
    finished ones, or after ``max_len`` tokens.

    Returns:
      sequences [batch, beam, max_len] (best first, EOS then 0-padded; without BOS)
      and their scores [batch, beam]. Examples with no finished hypothesis return
      their live beams, scored as if they ended at max_len.
    """
    check_cache_fits(cache, max_len, f"beam_search (max_len={max_len})")
    b, k = batch_size, beam_size
    first = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG_INF)  # identical beams at start
    state = dict(
        step=jnp.array(0), last=jnp.full((b, k), bos_id, jnp.int32),
        alive_seq=jnp.zeros((b, k, max_len), jnp.int32), alive_logp=first,
        done_seq=jnp.zeros((b, k, max_len), jnp.int32), done_score=jnp.full((b, k), NEG_INF),
        cache=cache)

    def not_finished(s):
        best_possible = s["alive_logp"][:, 0] / length_penalty(jnp.float32(max_len), alpha)
        worst_done = s["done_score"][:, -1]
        return (s["step"] < max_len) & jnp.any(best_possible > worst_done)

    def advance(s):
        logits, cache = step_fn(s["last"].reshape(b * k, 1), s["cache"])
        logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)).reshape(b, k, -1)
        vocab = logp.shape[-1]
        candidates = (s["alive_logp"][..., None] + logp).reshape(b, k * vocab)
        cand_logp, cand_index = jax.lax.top_k(candidates, 2 * k)  # enough to keep k alive
        origin, token = cand_index // vocab, cand_index % vocab
        seqs = jnp.take_along_axis(s["alive_seq"], origin[..., None], axis=1)
        seqs = seqs.at[:, :, s["step"]].set(token)
        is_eos = token == eos_id

        alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG_INF, cand_logp), k)
        take = lambda x: jnp.take_along_axis(x, keep if x.ndim == 2 else keep[..., None], axis=1)  # noqa: E731
        new_origin, new_token = take(origin), take(token)

        score = cand_logp / length_penalty(s["step"] + 1.0, alpha)
        merged_score = jnp.concatenate([s["done_score"], jnp.where(is_eos, score, NEG_INF)], 1)
        merged_seq = jnp.concatenate([s["done_seq"], seqs], axis=1)
        done_score, best = jax.lax.top_k(merged_score, k)
        done_seq = jnp.take_along_axis(merged_seq, best[..., None], axis=1)
        return dict(step=s["step"] + 1, last=new_token, alive_seq=take(seqs),
                    alive_logp=alive_logp, done_seq=done_seq, done_score=done_score,
                    cache=gather_beams(cache, new_origin))

    s = jax.lax.while_loop(not_finished, advance, state)
    any_done = s["done_score"][:, :1] > NEG_INF / 2
    alive_score = s["alive_logp"] / length_penalty(s["step"].astype(jnp.float32), alpha)
    sequences = jnp.where(any_done[..., None], s["done_seq"], s["alive_seq"])
    scores = jnp.where(any_done, s["done_score"], alive_score)
    return sequences, scores
