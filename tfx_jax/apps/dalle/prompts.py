"""Text prompts for digit images: a tiny fixed grammar with a word-level vocab.

DALL-E conditions on up to 256 BPE-encoded caption tokens. Our captions come
from a fixed grammar: one of `PROMPT_TEMPLATES` with the slot filled by the
digit as a word ("seven") or a numeral ("7"), e.g. "a handwritten seven",
"the digit 7", "an image of the number seven", "handwritten 7".
`DigitPrompts.sample` draws one for a label; `DigitPrompts.parse` reads any
prompt of the grammar back to its label; `encode` / `decode` map words to ids
0..vocab_size-1 and back.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from tfx_jax.errors import DataError, require

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(d) for d in range(10))
SLOT = "{}"
PROMPT_TEMPLATES = (
    "a handwritten {}",
    "handwritten {}",
    "the digit {}",
    "the number {}",
    "an image of the number {}",
    "a picture of a handwritten {}",
    "the number {} written by hand",
)


@dataclasses.dataclass(frozen=True)
class DigitPrompts:
    """Prompt grammar, sampler, parser and word-level tokenizer for digits 0-9."""

    templates: tuple[str, ...] = PROMPT_TEMPLATES

    def __post_init__(self):
        for template in self.templates:
            if template.split().count(SLOT) != 1:
                raise ValueError(f"template {template!r} must contain exactly one {SLOT!r} word")

    @functools.cached_property
    def vocab(self) -> tuple[str, ...]:
        """All words, sorted: template words, then number words, then numerals."""
        words = {w for t in self.templates for w in t.split() if w != SLOT}
        return tuple(sorted(words)) + NUMBER_WORDS + NUMERALS

    @functools.cached_property
    def _word_ids(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def max_length(self) -> int:
        """Words in the longest prompt."""
        return max(len(t.split()) for t in self.templates)

    def prompt(self, label: int, template_index: int = 0, *, numeral: bool = False) -> str:
        """The prompt for ``label`` from one template, slot as word or numeral."""
        if not 0 <= label <= 9:
            raise ValueError(f"digit label must be in 0..9, got {label}")
        slot = NUMERALS[label] if numeral else NUMBER_WORDS[label]
        return self.templates[template_index].format(slot)

    def sample(self, label: int, rng: np.random.Generator) -> str:
        """A random prompt for ``label``: uniform template, word or numeral."""
        template_index = int(rng.integers(len(self.templates)))
        return self.prompt(label, template_index, numeral=bool(rng.integers(2)))

    def words(self, prompt: str) -> list[str]:
        """Lower-cased words of ``prompt``; unknown words or too many raise a ValueError."""
        words = prompt.lower().split()
        if not words:
            raise DataError("empty prompt")
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        require(len(words) <= self.max_length,
                f"prompt {shown!r} has {len(words)} words; prompts have at most "
                f"{self.max_length} (the model reads {self.max_length} text positions), e.g. "
                f"{self.prompt(7)!r}", DataError)
        unknown = [w for w in words if w not in self._word_ids]
        if unknown:
            raise DataError(
                f"unknown word(s) {unknown} in prompt {prompt!r}; the vocabulary is: "
                + " ".join(self.vocab)
            )
        return words

    def parse(self, prompt: str) -> int:
        """The digit a prompt of the grammar names; ValueError if not in the grammar."""
        words = self.words(prompt)
        slots = [i for i, w in enumerate(words) if w in NUMBER_WORDS or w in NUMERALS]
        if len(slots) != 1:
            raise DataError(f"prompt {prompt!r} must name exactly one digit, found {len(slots)}")
        number = words[slots[0]]
        pattern = " ".join(words[: slots[0]] + [SLOT] + words[slots[0] + 1 :])
        if pattern not in self.templates:
            raise DataError(
                f"prompt {prompt!r} does not follow the grammar; prompts are one of "
                f"{list(self.templates)} with {SLOT} a digit (word or numeral)"
            )
        return NUMBER_WORDS.index(number) if number in NUMBER_WORDS else NUMERALS.index(number)

    def encode(self, prompt: str) -> list[int]:
        """Word ids of ``prompt`` (0..vocab_size-1); unknown words raise."""
        return [self._word_ids[w] for w in self.words(prompt)]

    def decode(self, ids) -> str:
        """Prompt text of word ids."""
        vocab = self.vocab
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(vocab)]
        if bad:
            raise ValueError(f"text token ids {bad} outside the vocabulary [0, {len(vocab)})")
        return " ".join(vocab[i] for i in ids)
