"""Grain batches for training the DALL-E-style generator on labelled images.

Each example becomes one joint sequence (`JointLayout`): a prompt for its
label, then its image tokens. Batches are dicts of NumPy arrays:

* ``"tokens"``: int32 [b, L], the joint sequences (inputs ``tokens[:, :-1]``,
  targets ``tokens[:, 1:]``);
* ``"weights"``: float32 [b, L], the loss weight of predicting token i from
  tokens before it (`JointLayout.loss_weights`; use ``weights[:, 1:]`` with the
  targets); zero on padding examples;
* ``"label"``: int32 [b], the digit the prompt names;
* ``"valid"``: bool [b], False only on eval padding.

Training draws a random prompt per example (template and word/numeral form)
from Grain's per-example generator, so the pairing is reproducible and a
resumed run is exact. Evaluation uses the canonical prompt
(``prompts.prompt(label)``, "a handwritten seven") and one padded pass.
"""
from __future__ import annotations

import functools

import grain
import numpy as np

from tfx_jax.errors import ConfigError
from tfx_jax.apps.dalle.image_tokens import ImageTokenizer
from tfx_jax.apps.dalle.joint_sequence import JointLayout
from tfx_jax.apps.dalle.prompts import DigitPrompts
from tfx_jax.data import grain_batches
from tfx_jax.data.image_datasets import ImageDataset

DALLE_TEXT_LOSS_WEIGHT = 1 / 8  # DALL-E's weighting: 1/8 text, 7/8 image


def _sequence_example(example, prompt, *, prompts, image_tokenizer, text_loss_weight):
    layout = JointLayout.for_tokenizers(prompts, image_tokenizer)
    text_ids = prompts.encode(prompt)
    image_ids = image_tokenizer.encode(example["image"])
    return {
        "tokens": layout.join(text_ids, image_ids),
        "weights": layout.loss_weights(len(text_ids), text_loss_weight),
        "label": np.int32(example["label"]),
    }


def _sampled_prompt_example(example, rng, **kwargs):
    prompt = kwargs["prompts"].sample(int(example["label"]), rng)
    return _sequence_example(example, prompt, **kwargs)


def _canonical_prompt_example(example, **kwargs):
    prompt = kwargs["prompts"].prompt(int(example["label"]))
    return _sequence_example(example, prompt, **kwargs)


def _transform(example_fn, dataset: ImageDataset, prompts, image_tokenizer, text_loss_weight):
    if tuple(dataset.image_shape) != tuple(image_tokenizer.image_shape):
        raise ConfigError(
            f"dataset {dataset.name!r} has images {dataset.image_shape} but the image "
            f"tokenizer expects {image_tokenizer.image_shape}"
        )
    if not 0.0 <= text_loss_weight <= 1.0:
        raise ConfigError(f"text_loss_weight must be in [0, 1], got {text_loss_weight}")
    return functools.partial(
        example_fn, prompts=prompts, image_tokenizer=image_tokenizer,
        text_loss_weight=text_loss_weight,
    )


def train_generator_batches(
    dataset: ImageDataset,
    *,
    prompts: DigitPrompts,
    image_tokenizer: ImageTokenizer,
    global_batch_size: int,
    seed: int,
    text_loss_weight: float = DALLE_TEXT_LOSS_WEIGHT,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Infinite shuffled joint-sequence batches of this process's shard."""
    transform = _transform(
        _sampled_prompt_example, dataset, prompts, image_tokenizer, text_loss_weight)
    return grain_batches.training_batches(
        dataset, global_batch_size=global_batch_size, seed=seed, transform=transform,
        process_index=process_index, process_count=process_count, read_options=read_options,
    )


def eval_generator_batches(
    dataset: ImageDataset,
    *,
    prompts: DigitPrompts,
    image_tokenizer: ImageTokenizer,
    global_batch_size: int,
    text_loss_weight: float = DALLE_TEXT_LOSS_WEIGHT,
    process_index: int | None = None,
    process_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """One padded pass with canonical prompts; ``"valid"`` marks real examples."""
    transform = _transform(
        _canonical_prompt_example, dataset, prompts, image_tokenizer, text_loss_weight)
    return grain_batches.evaluation_batches(
        dataset, global_batch_size=global_batch_size, transform=transform,
        process_index=process_index, process_count=process_count, read_options=read_options,
    )
