"""Training the DALL-E-style generator: next-token prediction over [text ; image] streams.

DALL-E (Ramesh et al. 2021, sec. 2.2) trains one decoder-only Transformer with
teacher forcing on the concatenated caption and image tokens: the input is the
stream shifted right, the target the stream itself, and the cross-entropies of
text and image tokens are weighted 1/8 and 7/8. The generator batches already
carry these weights per token (`JointLayout.loss_weights`), so the loss is

    loss = sum_i w_i * NLL(token_i | tokens_<i) / sum_i w_i,

with ``w = weights[:, 1:]`` against targets ``tokens[:, 1:]`` from inputs
``tokens[:, :-1]``. Each real sequence's weights sum to 1, so the loss is the
mean over examples of ``1/8 text NLL + 7/8 image NLL`` and padding rows count 0.

From an experiment config: :func:`image_tokenizer_from_config` and
:func:`generator_config` build the tokenizer and the LM, :func:`generator_task`
the training Task, and :func:`load_generator` a trained generator from its workdir.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from tfx_jax.errors import ConfigError, WorkdirNotFound
from tfx_jax import train as tr
from tfx_jax.apps.dalle.image_tokens import GrayLevelTokenizer, ImageTokenizer, PatchVQTokenizer
from tfx_jax.apps.dalle.joint_sequence import JointLayout
from tfx_jax.apps.dalle.prompts import DigitPrompts
from tfx_jax.lm import CausalLM, CausalLMConfig
from tfx_jax.model_config import from_config_dict
from tfx_jax.train.state import EvaluateFn
from tfx_jax.train.perf import causal_lm_forward_flops, training_flops

IMAGE_TOKENIZERS = ("gray_levels", "patch_vq")
PATCH_VQ_FILE = "patch_vq.npz"


def image_tokenizer_from_config(config: ml_collections.ConfigDict, workdir: str,
                                train_images: Optional[np.ndarray] = None) -> ImageTokenizer:
    """``config.image_tokenizer``: "gray_levels" (``num_gray_levels`` per pixel) or
    "patch_vq" (k-means codebook of ``codebook_size`` over ``vq_patch_size`` patches).

    The patch codebook is fitted on ``train_images`` once and kept in
    ``<workdir>/patch_vq.npz``; later runs (resume, generation) load it.
    """
    if config.image_tokenizer == "gray_levels":
        return GrayLevelTokenizer(image_shape=tuple(config.image_shape),
                                  num_levels=config.num_gray_levels)
    if config.image_tokenizer != "patch_vq":
        raise ConfigError(f"config.image_tokenizer must be one of {IMAGE_TOKENIZERS}, "
                         f"got {config.image_tokenizer!r}")
    path = epath.Path(workdir) / PATCH_VQ_FILE
    if path.exists():
        return PatchVQTokenizer.load(path)
    if train_images is None:
        raise WorkdirNotFound(f"no {PATCH_VQ_FILE} in workdir {workdir!r}: the patch "
                                f"codebook is fitted when training starts")
    tokenizer = PatchVQTokenizer.fit(train_images, codebook_size=config.codebook_size,
                                     patch_size=config.vq_patch_size, seed=config.seed)
    if jax.process_index() == 0:  # every host fits the same codebook (seeded); one writes it
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
    return tokenizer


def generator_config(config: ml_collections.ConfigDict, layout: JointLayout) -> CausalLMConfig:
    """The LM of an experiment config: ``config.model`` fields, vocabulary and length from
    the layout (the context is one token shorter than a sequence: the last token is
    only ever a target)."""
    return from_config_dict(CausalLMConfig, config.model, vocab_size=layout.vocab_size,
                            max_len=layout.sequence_length - 1)


def generator_task(config: CausalLMConfig, *, layout: JointLayout,
                   evaluate: Optional[EvaluateFn] = None) -> tr.Task:
    """The Task of the text-to-image LM on ``train_generator_batches`` batches.

    Metrics besides the weighted loss: ``image_nll`` (mean NLL per image token
    in nats), ``image_token_accuracy`` (teacher-forced argmax = target on image
    positions), and ``weight`` (the number of real sequences).
    """
    model = CausalLM(config)
    if config.vocab_size != layout.vocab_size:
        raise ValueError(f"the model's vocab_size {config.vocab_size} is not the layout's "
                         f"{layout.vocab_size}")
    if config.max_len < layout.sequence_length - 1:
        raise ValueError(f"the model's max_len {config.max_len} is shorter than the "
                         f"{layout.sequence_length - 1} input tokens of a joint sequence")
    is_image_target = jnp.arange(layout.sequence_length - 1) >= layout.image_position - 1

    def init_params(rng):
        tokens = jnp.zeros((1, layout.sequence_length - 1), jnp.int32)
        return model.init({"params": rng}, tokens)["params"]

    def loss_fn(params, batch, rng, train):
        tokens, weights = batch["tokens"], batch["weights"][:, 1:]
        targets = tokens[:, 1:]
        logits = model.apply({"params": params}, tokens[:, :-1], deterministic=not train,
                             rngs={"dropout": rng})
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        total = weights.sum()
        loss = (weights * nll).sum() / jnp.maximum(total, 1e-9)
        image = is_image_target[None, :] & batch["valid"][:, None]
        num_image = jnp.maximum(image.sum(), 1)
        correct = jnp.argmax(logits, axis=-1) == targets
        return loss, {"image_nll": jnp.where(image, nll, 0.0).sum() / num_image,
                      "image_token_accuracy": (correct & image).sum() / num_image,
                      "weight": total}

    length = layout.sequence_length - 1  # input tokens per sequence
    return tr.Task(init_params=init_params, loss_fn=loss_fn, evaluate=evaluate,
                   flops_per_example=training_flops(causal_lm_forward_flops(config, length)),
                   count_tokens=lambda batch: length * int(np.sum(batch["valid"])))



@dataclasses.dataclass(frozen=True)
class Generator:
    """A trained text-to-image generator: the LM, its parameters and its tokenizers."""
    model: CausalLM
    params: Any
    prompts: DigitPrompts
    image_tokenizer: ImageTokenizer

    @property
    def layout(self) -> JointLayout:
        return JointLayout.for_tokenizers(self.prompts, self.image_tokenizer)


def load_generator(workdir: str, *, step: Optional[int] = None) -> Generator:
    """Rebuilds the generator trained in ``workdir`` (config.json, tokenizer, checkpoint).

    Raises FileNotFoundError when the workdir holds no trained generator.
    """
    config = tr.load_config(workdir, job="dalle")
    prompts = DigitPrompts()
    image_tokenizer = image_tokenizer_from_config(config, workdir)
    layout = JointLayout.for_tokenizers(prompts, image_tokenizer)
    model_config = generator_config(config, layout)
    params = tr.restore_params(workdir, generator_task(model_config, layout=layout).init_params,
                               step=step)
    return Generator(model=CausalLM(model_config), params=params, prompts=prompts,
                     image_tokenizer=image_tokenizer)
