"""One token stream for text and image: DALL-E's input to a decoder-only LM.

DALL-E concatenates up to 256 text tokens and 1024 image tokens and trains a
Transformer to model the joint stream autoregressively; captions are padded to
a fixed length so the image always starts at the same position. We do the
same at toy scale, with one shared id space whose special ids are the
project's (:mod:`tfx_jax.data.tokenizer`) plus one of DALL-E's own:

    id 0 (PAD_ID)               padding (also the text padding)
    id 2 (BOS_ID)               first token of every sequence
    ids 1, 3 (EOS, UNK)         reserved by the project, unused here
    id 4 (BOI_ID)               begin-of-image separator: the first free id
    ids 5 .. 5+T-1              text words  (prompt tokenizer id + 5)
    ids 5+T .. 5+T+K-1          image codes (image tokenizer id + 5 + T)

    position  0     1 .. max_text_length    max_text_length+1   then
              BOS   words, then PAD          BOI                 image_length image ids

so ``sequence_length = max_text_length + 2 + image_length``. Generation feeds
`prefix` (everything up to and including BOI) and samples ``image_length``
tokens, restricting logits to `image_token_mask`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tfx_jax.errors import DataError
from tfx_jax.data.tokenizer import BOS_ID, NUM_RESERVED_IDS, PAD_ID

BOI_ID = NUM_RESERVED_IDS  # DALL-E's own special token: the first id the project leaves free
NUM_SPECIAL_TOKENS = BOI_ID + 1


@dataclasses.dataclass(frozen=True)
class JointLayout:
    """Id offsets and positions of the [BOS; text; PAD...; BOI; image] stream."""

    text_vocab_size: int
    image_vocab_size: int
    max_text_length: int
    image_length: int

    @classmethod
    def for_tokenizers(cls, prompts, image_tokenizer) -> "JointLayout":
        """Layout for a `DigitPrompts` and an `ImageTokenizer`."""
        return cls(
            text_vocab_size=prompts.vocab_size,
            image_vocab_size=image_tokenizer.vocab_size,
            max_text_length=prompts.max_length,
            image_length=image_tokenizer.sequence_length,
        )

    @property
    def text_offset(self) -> int:
        return NUM_SPECIAL_TOKENS

    @property
    def image_offset(self) -> int:
        return NUM_SPECIAL_TOKENS + self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        """Size of the shared id space (the LM's vocab_size)."""
        return self.image_offset + self.image_vocab_size

    @property
    def image_position(self) -> int:
        """Index of the first image token (BOI sits just before it)."""
        return self.max_text_length + 2

    @property
    def sequence_length(self) -> int:
        return self.image_position + self.image_length

    def prefix(self, text_ids: Sequence[int]) -> np.ndarray:
        """int32 [image_position]: BOS, shifted text ids, PAD..., BOI."""
        text_ids = np.asarray(text_ids, dtype=np.int64)
        if text_ids.ndim != 1 or not 1 <= len(text_ids) <= self.max_text_length:
            raise DataError(
                f"text must be 1..{self.max_text_length} ids, got shape {text_ids.shape}"
            )
        if text_ids.min() < 0 or text_ids.max() >= self.text_vocab_size:
            raise DataError(
                f"text ids must lie in [0, {self.text_vocab_size}), got {text_ids.tolist()}")
        prefix = np.full(self.image_position, PAD_ID, dtype=np.int32)
        prefix[0] = BOS_ID
        prefix[1 : 1 + len(text_ids)] = text_ids + self.text_offset
        prefix[-1] = BOI_ID
        return prefix

    def join(self, text_ids: Sequence[int], image_ids) -> np.ndarray:
        """int32 [sequence_length] from prompt ids and image-tokenizer ids."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        if image_ids.shape != (self.image_length,):
            raise ValueError(
                f"image ids must have shape ({self.image_length},), got {image_ids.shape}")
        if image_ids.min() < 0 or image_ids.max() >= self.image_vocab_size:
            raise ValueError(f"image ids must lie in [0, {self.image_vocab_size})")
        image_tokens = (image_ids + self.image_offset).astype(np.int32)
        return np.concatenate([self.prefix(text_ids), image_tokens])

    def split(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `join`: (text ids [n_words], image ids [image_length])."""
        tokens = np.asarray(tokens)
        if tokens.shape != (self.sequence_length,):
            raise ValueError(
                f"expected one sequence of shape ({self.sequence_length},), got {tokens.shape}")
        if tokens[0] != BOS_ID or tokens[self.image_position - 1] != BOI_ID:
            raise ValueError(
                f"not a joint sequence: position 0 must be BOS ({BOS_ID}) and position "
                f"{self.image_position - 1} BOI ({BOI_ID}), got {tokens[0]} and "
                f"{tokens[self.image_position - 1]}"
            )
        text = tokens[1 : self.image_position - 1]
        num_words = int(np.sum(text != PAD_ID))
        if not np.all(text[num_words:] == PAD_ID):
            raise ValueError(f"text tokens must be followed only by padding, got {text.tolist()}")
        words = text[:num_words].astype(np.int64) - self.text_offset
        if np.any(words < 0) or np.any(words >= self.text_vocab_size):
            raise ValueError(f"text positions hold non-text ids: {text.tolist()}")
        return words, self.image_ids(tokens)

    def image_ids(self, tokens) -> np.ndarray:
        """Image-tokenizer ids int32 [..., image_length] of joint sequences [..., L]."""
        tokens = np.asarray(tokens)
        if tokens.shape[-1:] != (self.sequence_length,):
            raise ValueError(
                f"expected sequences [..., {self.sequence_length}], got {tokens.shape}")
        ids = tokens[..., self.image_position :].astype(np.int64) - self.image_offset
        if ids.size and (ids.min() < 0 or ids.max() >= self.image_vocab_size):
            raise ValueError("image positions hold ids outside the image range "
                             f"[{self.image_offset}, {self.vocab_size})")
        return ids.astype(np.int32)

    def image_token_mask(self) -> np.ndarray:
        """bool [vocab_size]: True on image ids (mask logits when sampling images)."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[self.image_offset :] = True
        return mask

    def loss_weights(self, num_words: int, text_weight: float) -> np.ndarray:
        """float32 [sequence_length]: weight of predicting token i from tokens[:i].

        Text words share ``text_weight`` and image tokens ``1 - text_weight``
        (DALL-E weights the text and image cross-entropies 1/8 and 7/8); BOS, PAD
        and BOI (fixed, nothing to learn) get 0. Each sequence's weights sum to 1,
        so ``sum(weights * nll) / sum(weights)`` over a batch is the mean over
        examples of ``text_weight * text NLL + (1 - text_weight) * image NLL``.
        """
        if not 0.0 <= text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
        if not 1 <= num_words <= self.max_text_length:
            raise ValueError(f"num_words must be in 1..{self.max_text_length}, got {num_words}")
        weights = np.zeros(self.sequence_length, dtype=np.float32)
        weights[1 : 1 + num_words] = text_weight / num_words
        weights[self.image_position :] = (1.0 - text_weight) / self.image_length
        return weights
