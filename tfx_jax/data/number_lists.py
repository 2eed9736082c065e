"""Number lists: a translation corpus whose lengths spread like sentence lengths.

A pair is a list of numbers in English words and the same list in German
(grammar in ``number_words.py``)::

    twelve, three hundred five          zwölf, dreihundertfünf
    seven                               sieben

The count of numbers on a line is geometric (mean 3 by default, capped), so
most lines are short and a few are long -- the right-skewed spread of sentence
lengths in a real parallel corpus, which the built-in number_words data (one
number per pair, nearly all of about the same length) does not have. Each
number has 1 to 6 digits with equal probability. Rows sized to the long lines
are mostly padding, which is what sequence packing recovers
(``experiments/packing_throughput.py``); ``experiments/make_number_lists_tsv.py``
writes the pairs as TSV files.
"""
from __future__ import annotations

import numpy as np

from tfx_jax.data.number_words import number_words


def number_list_pairs(num_pairs: int, *, mean_count: float = 3.0, max_count: int = 24,
                      seed: int = 0) -> list[tuple[str, str]]:
    """``num_pairs`` (English list, German list) pairs, seeded."""
    if mean_count < 1 or max_count < 1:
        raise ValueError(f"mean_count must be >= 1 and max_count >= 1, got {mean_count}, "
                         f"{max_count}")
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.geometric(1 / mean_count, size=num_pairs), max_count)
    pairs = []
    for count in counts:
        digits = rng.integers(1, 7, size=count)
        numbers = [int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10 ** d)) for d in digits]
        pairs.append(tuple(", ".join(number_words(n, language) for n in numbers)
                           for language in ("en", "de")))
    return pairs
