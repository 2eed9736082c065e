"""Sequence packing: the packer's invariants, packed pipelines, segment-aware shifting."""
import numpy as np
import pytest
from absl import flags

from tfx_jax.apps.translation.task import shift_right
from tfx_jax.data import packing, text_pipeline
from tfx_jax.data.tokenizer import BOS_ID, EOS_ID

flags.FLAGS.mark_as_parsed()  # Grain reads absl flags


def _random_examples(n, max_lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [{key: rng.integers(4, 50, size=int(rng.integers(1, length + 1))).astype(np.int32)
             for key, length in max_lengths.items()} for _ in range(n)]


def _segments(row, segmentation):
    """The token runs of each segment id 1..n of one packed row."""
    return [row[segmentation == s] for s in range(1, segmentation.max() + 1)]


def check_row_invariants(row: dict, key: str) -> None:
    seg, pos, tokens = row[key + "_segmentation"], row[key + "_position"], row[key]
    n = seg.max()
    used = seg > 0
    # segments are 1..n in order, contiguous, padding (0) only at the end
    assert used[:used.sum()].all() and not used[used.sum():].any()
    assert (np.diff(seg[used]) >= 0).all() and set(seg[used]) == set(range(1, n + 1))
    # positions restart at 0 in each segment and count up by one
    for s in range(1, n + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    assert (tokens[~used] == 0).all() and (pos[~used] == 0).all()


def test_packed_rows_keep_every_example_whole_and_in_parallel():
    import grain
    lengths = {"inputs": 16, "targets": 12}
    examples = _random_examples(40, lengths, seed=1)
    dataset = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(packing.pack_dataset(dataset, lengths, num_packing_bins=4))
    assert len(rows) < len(examples)  # several examples share rows
    recovered = []
    for row in rows:
        for key, length in lengths.items():
            assert row[key].shape == (length,) and row[key].dtype == np.int32
            check_row_invariants(row, key)
        # source and target are packed in parallel: segment s of both is one example
        inputs = _segments(row["inputs"], row["inputs_segmentation"])
        targets = _segments(row["targets"], row["targets_segmentation"])
        assert len(inputs) == len(targets)
        recovered += [(tuple(i), tuple(t)) for i, t in zip(inputs, targets)]
    expected = sorted((tuple(e["inputs"]), tuple(e["targets"])) for e in examples)
    assert sorted(recovered) == expected  # nothing lost, cut or duplicated


def test_an_example_longer_than_the_row_is_an_error():
    import grain
    dataset = grain.MapDataset.source([{"targets": np.arange(1, 10, dtype=np.int32)}])
    with pytest.raises(ValueError, match="truncated to max length"):
        list(packing.pack_dataset(dataset.to_iter_dataset(), {"targets": 8}, num_packing_bins=2))
    with pytest.raises(ValueError, match="lengths\\['targets'\\] must be a positive integer"):
        packing.pack_dataset(dataset.to_iter_dataset(), {"targets": 0}, num_packing_bins=2)


def test_padding_fraction_counts_zero_slots():
    batches = iter([{"t": np.array([[1, 2, 0, 0], [3, 0, 0, 0]])},
                    {"t": np.array([[1, 1, 1, 1], [0, 0, 0, 0]])}])
    assert packing.padding_fraction(batches, ["t"], num_batches=5) == pytest.approx(9 / 16)
    with pytest.raises(ValueError, match="no batches"):
        packing.padding_fraction(iter([]), ["t"])


def test_shift_right_restarts_each_segment_with_bos():
    targets = np.array([[5, 6, EOS_ID, 7, EOS_ID, 0, 0]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 0, 0]], np.int32)
    np.testing.assert_array_equal(
        shift_right(targets, segment_ids=segments),
        [[BOS_ID, 5, 6, BOS_ID, 7, 0, 0]])
    np.testing.assert_array_equal(shift_right(targets), [[BOS_ID, 5, 6, EOS_ID, 7, EOS_ID, 0]])


class CharTokenizer:
    """One id per lower-case letter (4..29), for pipeline tests without SentencePiece."""
    vocab_size = 30

    def encode(self, text):
        return [4 + ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 4) for i in ids if i >= 4)


PAIRS = [("ab", "xyz"), ("c", "q"), ("defg", "rs"), ("h", "tuvw"), ("ij", "k"), ("l", "mn"),
         ("op", "abc"), ("q", "d"), ("rst", "ef"), ("u", "g")]


def _translation_batches(packed, **kwargs):
    return text_pipeline.train_batches(
        PAIRS, CharTokenizer(), global_batch_size=2, max_source_length=8, max_target_length=8,
        seed=3, packing=packed, **kwargs)


def test_packed_translation_batches_hold_whole_pairs():
    tokenizer = CharTokenizer()
    it = _translation_batches(True)
    seen = set()
    for _ in range(6):
        batch = next(it)
        assert batch["inputs"].shape == (2, 8) and batch["valid"].all()
        for row in range(2):
            single = {k: v[row] for k, v in batch.items() if k != "valid"}
            check_row_invariants(single, "inputs")
            check_row_invariants(single, "targets")
            for source, target in zip(_segments(single["inputs"], single["inputs_segmentation"]),
                                      _segments(single["targets"],
                                                single["targets_segmentation"])):
                assert source[-1] == EOS_ID and target[-1] == EOS_ID
                seen.add((tokenizer.decode(source[:-1]), tokenizer.decode(target[:-1])))
    assert seen <= set(PAIRS) and len(seen) == len(PAIRS)  # every pair, each one intact


def _count_pairs_per_row(num_batches):
    """Independent count: distinct non-zero segment ids of each packed row."""
    it = _translation_batches(True)
    counts = [len(np.unique(seg[seg > 0])) for _ in range(num_batches)
              for seg in next(it)["inputs_segmentation"]]
    return np.mean(counts)


def test_auto_packs_rows_with_a_spread_of_lengths_and_counts_pairs_per_row():
    choice = packing.choose_packing("auto", _translation_batches, ("inputs", "targets"))
    assert choice.enabled and choice.gain >= packing.AUTO_MIN_GAIN
    assert choice.padding_packed < choice.padding_unpacked / 2
    assert choice.examples_per_row == pytest.approx(_count_pairs_per_row(4))
    assert choice.examples_per_row >= 2
    assert "packing on" in choice.report("rows") and "'auto'" in choice.report("rows")
    # forced off: the same measurements, one example per row
    off = packing.choose_packing("FALSE", _translation_batches, ("inputs", "targets"))
    assert not off.enabled and off.examples_per_row == 1.0
    assert off.padding_unpacked == choice.padding_unpacked
    assert "packing off (config.packing = false)" in off.report("rows")


@pytest.mark.parametrize("setting", ["auto", "false"])
def test_the_chosen_measured_pipeline_comes_back_rewound_to_its_first_batch(setting):
    """The run trains on the pipeline the decision measured: it must start where a
    freshly built one starts, batch for batch, and not 4 batches in."""
    choice = packing.choose_packing(setting, _translation_batches, ("inputs", "targets"))
    fresh = _translation_batches(choice.enabled)
    for _ in range(6):
        expected, got = next(fresh), next(choice.batches)
        assert expected.keys() == got.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert packing.run_pipeline(choice) is choice.batches  # one process: the run's own
    assert packing.measurement_pipeline() == {}


def test_auto_does_not_pack_rows_that_are_nearly_full():
    full = [("abcdefg", "hijklmn")] * 6 + [("abcdef", "hijklm")] * 2  # 7-8 of 8 slots used

    def batches(packed):
        return text_pipeline.train_batches(
            full, CharTokenizer(), global_batch_size=2, max_source_length=8,
            max_target_length=8, seed=0, packing=packed)

    choice = packing.choose_packing("auto", batches, ("inputs", "targets"))
    assert not choice.enabled and choice.gain < packing.AUTO_MIN_GAIN
    assert choice.padding_unpacked < 0.1 and choice.examples_per_row == 1.0
    assert packing.choose_packing(True, batches, ("inputs",)).enabled  # forced on


@pytest.mark.parametrize("value", ["yes", 1, None, "on"])
def test_packing_setting_names_the_key(value):
    with pytest.raises(ValueError, match="config.packing must be 'auto', 'true' or 'false'"):
        packing.packing_setting(value)


def test_packed_iterator_resumes_exactly():
    it = _translation_batches(True)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = _translation_batches(True)
    resumed.set_state(state)
    for batch in expected:
        got = next(resumed)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])


def test_packed_batches_split_over_processes():
    rows = [next(text_pipeline.train_batches(
        PAIRS, CharTokenizer(), global_batch_size=4, max_source_length=8, max_target_length=8,
        seed=3, packing=True, process_index=p, process_count=2)) for p in range(2)]
    assert all(r["inputs"].shape == (2, 8) for r in rows)
    assert not np.array_equal(rows[0]["inputs"], rows[1]["inputs"])  # each its own shard


def test_a_packed_pipeline_that_drops_every_example_raises_instead_of_hanging():
    batches = packing.packed_training_batches(
        list(range(50)), global_batch_size=2, seed=0, transform=lambda example, rng: None,
        lengths={"targets": 8}, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="skipped 100.00 %"):
        next(batches)
