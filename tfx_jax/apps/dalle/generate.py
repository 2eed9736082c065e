"""Text to image: feed the prompt, then sample the image tokens one by one with the KV cache.

DALL-E generates an image by giving the Transformer the caption's tokens and
sampling the image tokens autoregressively; a decoder turns them back into
pixels. Here the prompt prefix ``[BOS, words, PAD..., BOI]`` goes through the
decode-mode :class:`tfx_jax.CausalLM` in one call (filling the key/value
caches), then ``image_length`` tokens are drawn by :func:`tfx_jax.decoding.sample`
(temperature, top-k), each from logits restricted to the image ids
(`JointLayout.image_token_mask`), so every sample decodes to a valid image.
Given the seed, generation is deterministic.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tfx_jax import decoding
from tfx_jax.apps.dalle.image_tokens import ImageTokenizer
from tfx_jax.apps.figures import save_png
from tfx_jax.apps.dalle.joint_sequence import JointLayout
from tfx_jax.apps.dalle.prompts import DigitPrompts
from tfx_jax.lm import CausalLM


def restrict_to_image_tokens(logits: jax.Array, layout: JointLayout) -> jax.Array:
    """Logits [..., vocab] with every non-image id set to ``decoding.NEG_INF``."""
    return jnp.where(jnp.asarray(layout.image_token_mask()), logits, decoding.NEG_INF)


@functools.partial(jax.jit, static_argnames=("model", "layout", "temperature", "top_k"))
def sample_sequences(model: CausalLM, params: Any, prefixes: jax.Array, rng: jax.Array, *,
                     layout: JointLayout, temperature: float = 1.0,
                     top_k: Optional[int] = None) -> jax.Array:
    """Completes prompt prefixes int32 [N, image_position] to joint sequences [N, L].

    ``model`` is the (training-mode) generator; its decode-mode twin shares the
    parameters. ``temperature=0`` is greedy decoding.
    """
    if prefixes.ndim != 2 or prefixes.shape[1] != layout.image_position:
        raise ValueError(f"prefixes must be [N, {layout.image_position}] "
                         f"(BOS, text, PAD..., BOI), got {tuple(prefixes.shape)}")
    decoder = CausalLM(model.config.replace(decode=True))
    context = jnp.zeros((prefixes.shape[0], layout.sequence_length - 1), jnp.int32)
    cache = decoder.init(jax.random.key(0), context)["cache"]  # zeros; the params init is dead code

    def step_fn(tokens, cache):
        logits, mutated = decoder.apply({"params": params, "cache": cache}, tokens,
                                        mutable=["cache"])
        return restrict_to_image_tokens(logits, layout), mutated["cache"]

    return decoding.sample(step_fn, cache, prefixes, layout.image_length, rng=rng,
                           temperature=temperature, top_k=top_k)


def generate_images(model: CausalLM, params: Any, prompts: DigitPrompts,
                    image_tokenizer: ImageTokenizer, texts: Sequence[str], *,
                    num_samples: int, seed: int = 0, temperature: float = 1.0,
                    top_k: Optional[int] = None) -> np.ndarray:
    """``num_samples`` images per prompt text: uint8 [len(texts), num_samples, H, W, C].

    Raises ValueError for a prompt outside the grammar (it names the vocabulary
    or the templates). The same seed gives the same images.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    layout = JointLayout.for_tokenizers(prompts, image_tokenizer)
    prefixes = np.stack([layout.prefix(prompts.encode(text)) for text in texts])
    prefixes = np.repeat(prefixes, num_samples, axis=0)
    decoding.check_token_ids(prefixes, model.config.vocab_size, "the prompt prefixes")
    run = decoding.checked(functools.partial(  # checked mode: cache overflow, ids under jit
        sample_sequences, model, layout=layout, temperature=float(temperature),
        top_k=top_k or None))
    sequences = run(params, jnp.asarray(prefixes), jax.random.key(seed))
    images = image_tokenizer.decode(layout.image_ids(np.asarray(sequences)))
    return images.reshape(len(texts), num_samples, *images.shape[1:])


def save_image_grid(path: str, images: np.ndarray, row_titles: Sequence[str], *,
                    dpi: int = 100) -> None:
    """A PNG grid (matplotlib): one row per prompt, one column per sample.

    ``images`` is uint8 [rows, columns, H, W, C] (C = 1 or 3). ``path`` may be
    a gs:// URL; its directory is created.
    """
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    images = np.asarray(images)
    if images.ndim != 5 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [rows, columns, H, W, 1 or 3], got "
                         f"{images.dtype} {images.shape}")
    rows, columns = images.shape[:2]
    if len(row_titles) != rows:
        raise ValueError(f"{len(row_titles)} row titles for {rows} rows")
    height = 1.0 * rows + 0.1
    figure = Figure(figsize=(0.8 * columns + 0.2, height), layout="constrained")
    figure.get_layout_engine().set(rect=(0, 0, 1, 1 - 0.2 / height))  # room for the first title
    axes = figure.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        for column in range(columns):
            ax = axes[row, column]
            image = images[row, column]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                      vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].text(0.0, 1.04, row_titles[row], fontsize=9, ha="left", va="bottom",
                          transform=axes[row, 0].transAxes, in_layout=False)
    save_png(figure, path, dpi=dpi)
