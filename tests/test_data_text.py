"""Text data layer: number_words builder, TSV and TFDS sources, tokenizer,
Grain pipelines."""
import json
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfx_jax.data import number_words as nw
from tfx_jax.data import text_pipeline, tokenizer as tok
from tfx_jax.data.text_pairs import (TranslationPairs, TsvPairs, open_text_pairs,
                                     tfds_translation_pairs)

tfds.disable_progress_bar()

TINY = nw.number_words_config("de", max_number=2999, train_size=300,
                               validation_size=23, test_size=37, split_seed=5,
                               train_all_below=100, small_number_repeats=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    nw.prepare_number_words(TINY, data_dir=path)
    return path


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory, data_dir):
    pairs = nw.number_words_pairs("train", data_dir=data_dir, config=TINY)
    return tok.load_or_train_tokenizer(
        pairs, tmp_path_factory.mktemp("workdir"), vocab_size=200)


class CharTokenizer:
    """Independent stand-in: one id per character, never 0..3."""

    def encode(self, text):
        return [ord(c) + 4 for c in text]


def _decode_chars(row):
    """Inverse of CharTokenizer for one padded row ending in EOS."""
    row = list(row)
    return "".join(chr(t - 4) for t in row[:row.index(tok.EOS_ID)])


# ---------------------------------------------------------------- number_words


def test_number_words_splits_are_disjoint_with_configured_sizes(data_dir):
    builder = nw.prepare_number_words(TINY, data_dir=data_dir)
    numbers = {}
    # train: 300 distinct numbers, those below 100 twice (small_number_repeats=2)
    for split, size, length in (("train", 300, 400), ("validation", 23, 23), ("test", 37, 37)):
        records = builder.as_data_source(split=split)
        assert len(records) == length
        listed = [int(records[i]["number"]) for i in range(length)]
        numbers[split] = set(listed)
        assert len(numbers[split]) == size
        assert all(listed.count(n) == (2 if split == "train" and n < 100 else 1)
                   for n in numbers[split])
        assert all(0 <= n <= 2999 for n in numbers[split])
        record = records[0]
        n = int(record["number"])
        assert record["en"].decode() == nw.english_number_words(n)
        assert record["de"].decode() == nw.german_number_words(n)
    assert set(range(100)) <= numbers["train"]  # train_all_below
    assert min(numbers["test"] | numbers["validation"]) >= 100
    assert not numbers["train"] & numbers["validation"]
    assert not numbers["train"] & numbers["test"]
    assert not numbers["validation"] & numbers["test"]


def test_number_words_test_split_does_not_move_when_train_grows():
    small = nw.number_words_config("de", max_number=999, train_size=10,
                                    validation_size=5, test_size=20, train_all_below=10)
    large = nw.number_words_config("de", max_number=999, train_size=900,
                                    validation_size=5, test_size=20, train_all_below=10)
    np.testing.assert_array_equal(small.split_numbers()["test"],
                                  large.split_numbers()["test"])
    assert small.name != large.name


def test_number_words_pairs_direction(data_dir):
    forward = nw.number_words_pairs("test", data_dir=data_dir, config=TINY)
    backward = nw.number_words_pairs("test", data_dir=data_dir, config=TINY,
                                      source_language="de")
    assert backward[3] == forward[3][::-1]
    in_memory = open_text_pairs("number_words", "test", data_dir=data_dir,
                                number_words_config=TINY, in_memory=True)
    assert isinstance(in_memory, list)
    assert in_memory == forward.to_list(chunk_size=10) == [
        forward[i] for i in range(37)]
    with pytest.raises(IndexError):
        forward[37]  # pylint: disable=pointless-statement
    english, german = forward[3]
    assert " " in english or english in nw._ENGLISH_BELOW_20
    assert " " not in german


def test_number_words_korean_config(tmp_path):
    config = nw.number_words_config("ko", max_number=99_999, train_size=20,
                                     validation_size=5, test_size=5, train_all_below=0)
    pairs = open_text_pairs("number_words", "validation", data_dir=str(tmp_path),
                            number_words_config=config)
    assert len(pairs) == 5
    english, korean = pairs[0]
    assert english.split()[0] in nw._ENGLISH_BELOW_20 + nw._ENGLISH_TENS
    assert all("\uac00" <= c <= "\ud7a3" or c == " " for c in korean)


def test_number_words_config_errors():
    with pytest.raises(ValueError, match="exceeds the 100 numbers"):
        nw.number_words_config(max_number=99, train_size=90, validation_size=6,
                                test_size=5)
    with pytest.raises(ValueError, match="target_language"):
        nw.number_words_config("fr")
    with pytest.raises(ValueError, match="test_size must be >= 1"):
        nw.number_words_config(test_size=0)
    with pytest.raises(ValueError, match="train_all_below=1000 puts more numbers"):
        nw.number_words_config(max_number=9999, train_size=500)


# ------------------------------------------------------------------------- TSV


def _write(path, text: str | bytes):
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_tsv_reads_pairs(tmp_path):
    path = _write(tmp_path / "corpus.tsv",
                  "ein Haus\ta house\r\nzwei Häuser\ttwo houses\n drei \t three")
    pairs = open_text_pairs(path, "train")
    assert isinstance(pairs, TsvPairs)
    assert len(pairs) == 3
    assert list(pairs) == [("ein Haus", "a house"), ("zwei Häuser", "two houses"),
                           (" drei ", " three")]


@pytest.mark.parametrize("bad_line,message", [
    ("no tab here", "exactly one tab"),
    ("a\tb\tc", "found 2 tabs"),
    ("\tonly target", "source side is empty"),
    ("only source\t  ", "target side is empty"),
    ("", "a blank line between sentence pairs"),
])
def test_tsv_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path / "bad.tsv", f"x\ty\nx2\ty2\n{bad_line}\nx4\ty4\n")
    with pytest.raises(ValueError, match=message) as info:
        TsvPairs(path)
    assert f"bad.tsv:3:" in str(info.value)


def test_tsv_invalid_utf8_and_missing_file(tmp_path):
    path = _write(tmp_path / "latin1.tsv", b"ok\tok\ncaf\xe9\tcafe\n")
    with pytest.raises(ValueError, match=r"latin1.tsv:2: not valid UTF-8"):
        TsvPairs(path)
    missing = str(tmp_path / "missing.tsv")
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        open_text_pairs(missing)
    with pytest.raises(ValueError, match="no sentence pairs"):
        TsvPairs(_write(tmp_path / "empty.tsv", ""))


# ------------------------------------------------------------------------ TFDS


def test_tfds_translation_by_name_with_mock_data():
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                                num_examples=6):
        default = open_text_pairs("wmt14_translate/de-en", "train")
        en_de = open_text_pairs("wmt14_translate/de-en", "train",
                                source_language="en", target_language="de")
        only_target = tfds_translation_pairs("wmt14_translate/de-en", "test",
                                             target_language="de")
        assert isinstance(default, TranslationPairs)
        assert (default.source_language, default.target_language) == ("de", "en")
        assert (only_target.source_language, only_target.target_language) == (
            "en", "de")
        assert len(default) == len(en_de) == 6
        for i in range(6):
            assert en_de[i] == default[i][::-1]
            assert all(isinstance(text, str) for text in default[i])
        with pytest.raises(ValueError, match="'fr' is not one of"):
            tfds_translation_pairs("wmt14_translate/de-en", "train",
                                   source_language="fr")
        with pytest.raises(ValueError, match="unknown TFDS dataset name"):
            open_text_pairs("no_such_translate/de-en", "train")


def test_tfds_unprepared_dataset_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build wmt14_translate"):
        tfds_translation_pairs("wmt14_translate/de-en", "train",
                               data_dir=str(tmp_path))


def test_translation_pairs_checks_languages():
    records = [{"de": b"Haus", "en": b"house"}]
    assert TranslationPairs(records, "en", "de")[0] == ("house", "Haus")
    assert TranslationPairs(records * 3, "de", "en").to_list(chunk_size=2) == [
        ("Haus", "house")] * 3
    with pytest.raises(ValueError, match="source_language='fr'"):
        TranslationPairs(records, "fr", "de")
    with pytest.raises(ValueError, match="both 'en'"):
        TranslationPairs(records, "en", "en")


def test_open_text_pairs_rejects_empty_spec():
    with pytest.raises(ValueError, match="non-empty string"):
        open_text_pairs("", "train")


# ------------------------------------------------------------------- tokenizer


def test_tokenizer_reserved_ids_and_round_trip(spm_tokenizer, data_dir):
    processor = spm_tokenizer._processor
    assert [processor.id_to_piece(i) for i in range(4)] == [
        "<pad>", "</s>", "<s>", "<unk>"]
    assert 4 < spm_tokenizer.vocab_size <= 200
    for source, target in nw.number_words_pairs("test", data_dir=data_dir,
                                                 config=TINY):
        for text in (source, target):
            ids = spm_tokenizer.encode(text)
            assert min(ids) > tok.UNK_ID  # held-out text, no unknown pieces
            assert spm_tokenizer.decode(ids) == text
            # Decoding stops at EOS and skips padding.
            assert spm_tokenizer.decode(ids + [tok.EOS_ID, 7, 9, 0, 0]) == text
            assert spm_tokenizer.decode(np.array(ids + [0, 0])) == text


class _MustNotBeRead:
    def __len__(self):
        raise AssertionError("the cached tokenizer should not read the corpus")

    __getitem__ = __len__


def test_tokenizer_is_cached_and_reloaded(tmp_path):
    pairs = [("one two three", "eins zwei drei"), ("four", "vier")]
    first = tok.load_or_train_tokenizer(pairs, tmp_path, vocab_size=40)
    path = tok.tokenizer_path(tmp_path, 40)
    assert first.model_path == path and os.path.isfile(path)
    stamp = os.stat(path).st_mtime_ns
    second = tok.load_or_train_tokenizer(_MustNotBeRead(), tmp_path,
                                         vocab_size=40)
    assert os.stat(path).st_mtime_ns == stamp
    assert second.encode("eins zwei vier") == first.encode("eins zwei vier")
    assert second.decode(first.encode("four three")) == "four three"
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        tok.SentencePieceTokenizer(tmp_path / "nothing.model")
    with pytest.raises(ValueError, match="vocab_size must be >= 5"):
        tok.train_sentencepiece(["a"], tmp_path / "x.model", vocab_size=4)


def test_tokenizer_split_digits_spells_numbers_digit_by_digit(tmp_path):
    pairs = [(f"{year}-05-0{day}", f"the {day} of May {year}")
             for year in range(1990, 2030) for day in range(1, 8)]
    merged = tok.load_or_train_tokenizer(pairs, tmp_path, vocab_size=300)
    split = tok.load_or_train_tokenizer(pairs, tmp_path, vocab_size=300, split_digits=True)
    assert split.model_path == tok.tokenizer_path(tmp_path, 300, split_digits=True)
    assert split.model_path != merged.model_path  # separate cache files
    pieces = [split._processor.id_to_piece(i) for i in split.encode("2024-05-03")]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024" "05" "03")
    assert split.decode(split.encode("the 3 of May 2024")) == "the 3 of May 2024"
    assert any(len(merged._processor.id_to_piece(i).strip("\u2581")) > 1
               for i in merged.encode("2024")), "without split_digits years merge"


# -------------------------------------------------------------------- pipeline

PAIRS = [(f"s{i}" + "a" * (i % 5), f"t{i}" + "b" * (i % 3)) for i in range(40)]


def _train(pairs=PAIRS, **kwargs):
    defaults = dict(global_batch_size=8, max_source_length=8,
                    max_target_length=8, seed=3, process_index=0,
                    process_count=1)
    return text_pipeline.train_batches(pairs, CharTokenizer(),
                                       **{**defaults, **kwargs})


def test_train_batch_format_eos_and_padding():
    batch = next(_train())
    assert set(batch) == {"inputs", "targets", "valid"}
    assert batch["valid"].dtype == np.bool_ and batch["valid"].all()
    for key in ("inputs", "targets"):
        assert batch[key].shape == (8, 8) and batch[key].dtype == np.int32
    by_source = dict(PAIRS)
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        for row in (inputs, targets):
            eos = list(row).index(tok.EOS_ID)
            assert np.all(row[eos + 1:] == 0) and np.all(row[:eos] > tok.UNK_ID)
        assert by_source[_decode_chars(inputs)] == _decode_chars(targets)


def test_train_truncates_keeping_eos_or_drops():
    long_pairs = [("abcdefgh", "xy"), ("ab", "xy")] * 4
    truncated = next(_train(long_pairs, max_source_length=4))["inputs"]
    expected_long = [ord(c) + 4 for c in "abc"] + [tok.EOS_ID]
    expected_short = [ord(c) + 4 for c in "ab"] + [tok.EOS_ID, 0]
    assert {tuple(r) for r in truncated} == {tuple(expected_long),
                                              tuple(expected_short)}
    dropped = next(_train(long_pairs, max_source_length=4, drop_overlong=True))
    assert all(tuple(r) == tuple(expected_short) for r in dropped["inputs"])


def test_train_epochs_are_shuffled_permutations():
    iterator = _train()
    epochs = [[_decode_chars(r) for _ in range(5) for r in next(iterator)["inputs"]]
              for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(s for s, _ in PAIRS)
    assert epochs[0] != epochs[1]
    assert epochs[0] != [s for s, _ in PAIRS]


@pytest.mark.parametrize("threads", [None, 0])
def test_train_iterator_state_restores_the_same_batches(threads):
    options = None if threads is None else grain.ReadOptions(num_threads=threads)
    iterator = _train(seed=11, read_options=options)
    for _ in range(7):  # past the first epoch boundary (5 batches)
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    resumed = _train(seed=11, read_options=options)
    resumed.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other_seed = next(_train(seed=12))
    assert not np.array_equal(other_seed["inputs"], next(_train(seed=11))["inputs"])


def test_train_process_shards_are_disjoint_and_cover_the_data():
    seen = []
    for index in (0, 1):
        iterator = _train(process_index=index, process_count=2)  # local batch 4
        batches = [next(iterator) for _ in range(5)]  # 20 examples: one epoch
        assert batches[0]["inputs"].shape == (4, 8)
        seen.append({_decode_chars(r) for b in batches for r in b["inputs"]})
    assert len(seen[0]) == len(seen[1]) == 20
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {s for s, _ in PAIRS}


def test_batch_size_must_divide_over_processes():
    with pytest.raises(ValueError, match="multiple of the number of processes \\(3\\)"):
        _train(process_count=3)
    with pytest.raises(ValueError, match="max_source_length must be >= 2"):
        _train(max_source_length=1)


def _eval(pairs=PAIRS[:13], **kwargs):
    defaults = dict(global_batch_size=4, max_source_length=8,
                    max_target_length=8, process_index=0, process_count=1)
    return text_pipeline.eval_batches(pairs, CharTokenizer(),
                                      **{**defaults, **kwargs})


def test_eval_single_pass_with_valid_flags():
    data = _eval()
    assert data.num_examples == 13 and len(data) == 4
    for _ in range(2):  # re-iterable: each pass is the same finite pass
        batches = list(data)
        assert len(batches) == 4
        valid = np.concatenate([b["valid"] for b in batches])
        assert valid.dtype == np.bool_ and valid.sum() == 13
        assert valid[:13].all() and not valid[13:].any()
        last = batches[-1]
        assert last["inputs"].shape == (4, 8)
        assert np.all(last["inputs"][1:] == 0) and np.all(last["targets"][1:] == 0)
        decoded = [_decode_chars(r) for b in batches for r, ok in
                   zip(b["targets"], b["valid"]) if ok]
        assert decoded == data.references == [t for _, t in PAIRS[:13]]
    assert data.sources == [s for s, _ in PAIRS[:13]]


def test_eval_references_are_untruncated():
    data = _eval([("abcdefgh", "uvwxyz")], max_target_length=3)
    batch = next(iter(data))
    assert data.references == ["uvwxyz"]
    assert list(batch["targets"][0]) == [ord("u") + 4, ord("v") + 4, tok.EOS_ID]
    assert batch["valid"].tolist() == [True, False, False, False]


def test_eval_process_shards_rebuild_the_global_order():
    shards = [list(_eval(process_index=i, process_count=2)) for i in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 4
    global_order = []
    for local0, local1 in zip(*shards):  # process-local rows in process order
        assert local0["inputs"].shape == (2, 8)
        for b in (local0, local1):
            global_order += [_decode_chars(r) for r, ok in
                             zip(b["targets"], b["valid"]) if ok]
    two_process = _eval(process_index=0, process_count=2)
    assert global_order == two_process.references
    by_target = {t: s for s, t in PAIRS}
    assert two_process.sources == [by_target[t] for t in global_order]
    # Each global batch holds the same 4 examples as with one process.
    single = _eval().references
    for start in range(0, 13, 4):
        assert sorted(global_order[start:start + 4]) == sorted(single[start:start + 4])


def test_number_words_end_to_end_with_sentencepiece(spm_tokenizer, data_dir):
    train = open_text_pairs("number_words", "train", data_dir=data_dir,
                            number_words_config=TINY)
    test = open_text_pairs("number_words", "test", data_dir=data_dir,
                           number_words_config=TINY)
    batch = next(text_pipeline.train_batches(
        train, spm_tokenizer, global_batch_size=16, max_source_length=24,
        max_target_length=24, process_index=0, process_count=1))
    train_texts = set(train)
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        pair = (spm_tokenizer.decode(inputs), spm_tokenizer.decode(targets))
        assert pair in train_texts
    data = text_pipeline.eval_batches(
        test, spm_tokenizer, global_batch_size=16, max_source_length=24,
        max_target_length=24, process_index=0, process_count=1)
    decoded = [spm_tokenizer.decode(r) for b in data
               for r, ok in zip(b["targets"], b["valid"]) if ok]
    assert decoded == data.references and len(decoded) == 37
