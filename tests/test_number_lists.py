"""The number-lists corpus: pairs that agree item by item, lengths with a long right tail."""
import numpy as np
import pytest

from tfx_jax.data import number_words as grammar
from tfx_jax.data.number_lists import number_list_pairs

# The number back from its English words, for numbers below 1,000 (a lookup the test can
# afford); larger items are checked only for being there on both sides.
_SMALL = {grammar.number_words(n, "en"): n for n in range(1000)}


def test_pairs_agree_item_by_item_and_counts_are_long_tailed():
    pairs = number_list_pairs(3000, mean_count=3.0, max_count=24, seed=1)
    assert pairs == number_list_pairs(3000, mean_count=3.0, max_count=24, seed=1)  # seeded
    counts = []
    checked = 0
    for source, target in pairs:
        english, german = source.split(", "), target.split(", ")
        assert len(english) == len(german)
        counts.append(len(english))
        for en, de in zip(english, german):
            if en in _SMALL:  # numbers below 1,000: check the translation itself
                assert de == grammar.number_words(_SMALL[en], "de")
                checked += 1
    counts = np.array(counts)
    assert checked > 1000
    assert 1 <= counts.min() and counts.max() <= 24
    assert counts.mean() == pytest.approx(3.0, rel=0.1)  # geometric, mean 3
    assert np.mean(counts == 1) == pytest.approx(1 / 3, abs=0.03)  # most lines are short ...
    assert np.percentile(counts, 99) >= 4 * np.median(counts)  # ... and a few are long


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mean_count must be >= 1"):
        number_list_pairs(3, mean_count=0.5)


def test_written_tsv_reads_back_pair_for_pair(tmp_path):
    from tfx_jax.data.text_pairs import TsvPairs, write_tsv_pairs
    pairs = number_list_pairs(50, seed=2)
    assert write_tsv_pairs(tmp_path / "lists.tsv", pairs) == 50
    assert list(TsvPairs(tmp_path / "lists.tsv")) == pairs
    with pytest.raises(ValueError, match="pair 1: the target 'a\\\\tb' is empty or holds a tab"):
        write_tsv_pairs(tmp_path / "bad.tsv", [("x", "y"), ("x", "a\tb")])
