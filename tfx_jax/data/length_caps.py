"""Row lengths from the data: fit the typical pair, never let one outlier set the shape.

Every batch is padded to fixed row lengths, so the longest pair sets the cost
of *every* step: one 10,000-character line in a corpus of short sentences
makes every row 10,002 tokens long (attention is quadratic in it). The caps
are therefore taken from the distribution of token lengths, side by side:

* ``p`` = the ``percentile`` (default 99th) of the lengths (tokens + EOS);
* a pair longer than ``outlier_factor * p`` (default 2x) is an *outlier*;
* the cap is the longest length that is not an outlier.

A corpus without outliers (all lengths within 2x of the 99th percentile, as in
most clean corpora and the built-in number_words) keeps every pair whole; the
outliers are cut to the cap (or left out of training with ``drop_overlong``),
and :class:`LengthCaps` counts them so the caller can say how many.

The percentile uses NumPy's ``"lower"`` method: in a file of fewer than 100
pairs the longest but one is the typical length, so a single outlier is still
found there (several in a tiny file are not outliers by this rule).

Lengths are measured on up to ``max_pairs`` pairs (a seeded sample of larger
corpora); counts are then scaled to the whole corpus and marked as estimates.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tfx_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class LengthCaps:
    """Row lengths (EOS included) and what they cut."""
    max_source_length: int
    max_target_length: int
    num_measured: int        # pairs whose lengths were measured
    num_pairs: int           # pairs in the corpus
    num_longer: int          # measured pairs longer than a cap on either side
    longest_source: int      # longest measured row lengths, EOS included
    longest_target: int
    percentile: float

    @property
    def estimated_longer(self) -> int:
        """Pairs of the whole corpus longer than a cap (scaled up from the sample)."""
        return round(self.num_longer * self.num_pairs / max(self.num_measured, 1))

    def describe(self, drop_overlong: bool = False) -> str:
        """One line for the console: the caps and how many pairs they cut or drop."""
        what = "left out of training" if drop_overlong else "cut to fit"
        approx = "" if self.num_measured == self.num_pairs else "about "
        line = (f"rows of {self.max_source_length} source / {self.max_target_length} target "
                f"tokens (EOS included; from the {self.percentile:g}th percentile of "
                f"{self.num_measured} pairs' lengths); {approx}{self.estimated_longer} of "
                f"{self.num_pairs} pairs are longer and are {what}")
        if self.num_longer:
            line += (f". warning: outliers up to {self.longest_source} source / "
                     f"{self.longest_target} target tokens; check the data for merged "
                     f"or broken lines")
        return line


def _cap(lengths: np.ndarray, percentile: float, outlier_factor: float) -> int:
    typical = float(np.percentile(lengths, percentile, method="lower"))
    kept = lengths[lengths <= outlier_factor * typical]
    return int(kept.max()) if kept.size else int(typical)


def length_caps(pairs: Sequence[tuple[str, str]], tokenizer, *, percentile: float = 99.0,
                outlier_factor: float = 2.0, max_pairs: int = 10_000,
                seed: int = 0) -> LengthCaps:
    """Row lengths for ``pairs`` (see the module docstring) and the count of pairs they cut.

    Args:
      pairs: ``(source_text, target_text)`` pairs, random access.
      tokenizer: has ``encode(str) -> list[int]`` (EOS not included; one is added).
      percentile: in (0, 100]; the typical length that outliers are measured against.
      outlier_factor: >= 1; pairs longer than this many times the percentile are cut.
      max_pairs: measure at most this many pairs (a seeded sample).
      seed: seed of the sample.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not outlier_factor >= 1:
        raise ValueError(f"outlier_factor must be >= 1, got {outlier_factor}")
    if len(pairs) == 0:  # pylint: disable=g-explicit-length-test
        raise DataError("cannot measure the lengths of an empty corpus")
    indices = np.arange(len(pairs))
    if len(pairs) > max_pairs:
        indices = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
    lengths = np.asarray([[len(tokenizer.encode(text)) + 1 for text in pairs[int(i)]]
                          for i in indices])
    source_cap = _cap(lengths[:, 0], percentile, outlier_factor)
    target_cap = _cap(lengths[:, 1], percentile, outlier_factor)
    longer = (lengths[:, 0] > source_cap) | (lengths[:, 1] > target_cap)
    return LengthCaps(max_source_length=max(source_cap, 2), max_target_length=max(target_cap, 2),
                      num_measured=len(indices), num_pairs=len(pairs),
                      num_longer=int(longer.sum()), longest_source=int(lengths[:, 0].max()),
                      longest_target=int(lengths[:, 1].max()), percentile=percentile)
