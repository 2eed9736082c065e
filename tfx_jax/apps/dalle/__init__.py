"""The DALL-E-style generator's data side: image and text tokens in one stream.

DALL-E (Ramesh et al. 2021) models a caption's tokens followed by an image's
tokens with one decoder-only Transformer. Here: images of digits become tokens
by grey-level quantisation (`GrayLevelTokenizer`) or a k-means patch codebook
(`PatchVQTokenizer`); prompts from a small grammar become word tokens
(`DigitPrompts`); `JointLayout` joins both into one id space; and
`train_generator_batches` / `eval_generator_batches` feed the LM. PAD and BOS
are the project's ids (:mod:`tfx_jax.data.tokenizer`); ``BOI_ID`` is the one
special id of DALL-E's own.
"""
from tfx_jax.apps.dalle.image_tokens import GrayLevelTokenizer, ImageTokenizer, PatchVQTokenizer
from tfx_jax.apps.dalle.input_pipeline import (
    DALLE_TEXT_LOSS_WEIGHT,
    eval_generator_batches,
    train_generator_batches,
)
from tfx_jax.apps.dalle.joint_sequence import BOI_ID, JointLayout
from tfx_jax.apps.dalle.prompts import PROMPT_TEMPLATES, DigitPrompts

__all__ = [
    "BOI_ID",
    "DALLE_TEXT_LOSS_WEIGHT",
    "DigitPrompts",
    "GrayLevelTokenizer",
    "ImageTokenizer",
    "JointLayout",
    "PROMPT_TEMPLATES",
    "PatchVQTokenizer",
    "eval_generator_batches",
    "train_generator_batches",
]
