"""Issue 23, items 3, 6, 7 and 11: data a user brings (corpus directories and files, TSV
files, image paths, prompts) and token ids the model cannot read. Each case asserts the
outcome under the scripts' error handling (exit code 2 and one line, or the line the run
prints) and, for a refused lm run, that its workdir stays as it was.
"""
import functools
import hashlib

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import checkify

from scripts import experiment_config
from test_robustness_train import run_as_script
from tfx_jax import decoding
from tfx_jax.apps.dalle.prompts import DigitPrompts
from tfx_jax.apps.language_model import corpus as corpus_lib
from tfx_jax.apps.language_model import experiment as lm_experiment
from tfx_jax.apps.language_model.pipeline import load_or_train_lm_tokenizer
from tfx_jax.apps.language_model.sampling import generate_ids
from tfx_jax.data.image_preprocess import read_image_file
from tfx_jax.data.tokenizer import train_sentencepiece
from tfx_jax.data.text_pairs import TsvPairs
from tfx_jax.errors import DataError
from tfx_jax.lm import CausalLM, CausalLMConfig


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0][len("error: "):]


def blocks_file(path, n=20, word="block"):
    path.write_text("\n\n".join(f"{word} {i} of {path.name}" for i in range(n)) + "\n")


def digests(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- lm corpus (items 3 and 6) ------------------------------------------------------------------

def test_non_utf8_files_are_named_and_a_corpus_that_loses_most_is_refused(tmp_path, capsys):
    for i in range(3):
        blocks_file(tmp_path / f"good{i}.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    corpus = corpus_lib.open_corpus(str(tmp_path))
    out = capsys.readouterr().err
    assert f"{tmp_path}: skipped 1 of 4 files: latin1.txt (not UTF-8); they are left out" in out
    assert len(corpus.train) + len(corpus.eval) == 60
    for i in range(4):
        (tmp_path / f"bad{i}.md").write_bytes(b"\xff\xfe text")
    assert run_as_script(lambda: corpus_lib.open_corpus(str(tmp_path))) == 2
    assert one_error_line(capsys).startswith(f"{tmp_path}: skipped 5 of 8 files: bad0.md (not "
                                             f"UTF-8), bad1.md (not UTF-8)")


def test_binary_files_get_a_clear_message_and_a_refused_run_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_bytes(b"\x00\x01\x02binary")
    (data / "b.py").write_bytes(b"PK\x03\x04\x00\x00")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    before = digests(workdir)
    config = experiment_config("lm")
    config.dataset = str(data)
    assert run_as_script(lambda: lm_experiment.train(config, str(workdir))) == 2
    assert one_error_line(capsys) == (
        f"{data}: skipped 2 of 2 files: a.txt (binary), b.py (binary); most of the corpus "
        f"would be lost (lm.py reads UTF-8 text)")
    assert digests(workdir) == before


def test_unread_extensions_are_named(tmp_path, capsys):
    (tmp_path / "a.rst").write_text("text\n")
    (tmp_path / "b.csv").write_text("1,2\n")
    assert run_as_script(lambda: corpus_lib.open_corpus(str(tmp_path))) == 2
    assert one_error_line(capsys) == (
        f"empty corpus: '{tmp_path}' has no .py, .txt, .md files (it has 1 .csv, 1 .rst); "
        f"lm.py reads files with these extensions (a single file of any name can be given "
        f"as config.dataset)")


@pytest.mark.parametrize("num_files", [1, 3])
def test_few_files_still_get_a_held_out_split(tmp_path, capsys, num_files):
    for i in range(num_files):
        blocks_file(tmp_path / f"f{i}.txt")
    corpus = corpus_lib.open_corpus(str(tmp_path), eval_fraction=0.05)
    assert corpus.train and corpus.eval
    assert len(corpus.train) + len(corpus.eval) == 20 * num_files
    if not any(corpus_lib.is_held_out(f"f{i}.txt", 0.05) for i in range(num_files)):
        assert "held out the last" in capsys.readouterr().err


def test_a_single_file_of_any_name_is_a_corpus(tmp_path, capsys):
    blocks_file(tmp_path / "notes.rst", n=40)
    corpus = corpus_lib.open_corpus(str(tmp_path / "notes.rst"))
    assert len(corpus.train) == 39 and corpus.eval == ["block 39 of notes.rst"]
    assert corpus.description == f"file {tmp_path / 'notes.rst'}: 39 / 1 blocks"
    capsys.readouterr()  # the run's notes (stderr) so far
    assert run_as_script(lambda: corpus_lib.open_corpus(str(tmp_path / "missing.txt"))) == 2
    assert one_error_line(capsys) == f"config.dataset: no such file '{tmp_path / 'missing.txt'}'"


def test_one_line_300kb_files_are_cut_into_blocks_sentencepiece_can_train_on(tmp_path, capsys):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(" ".join(f"w{i % 97}" for i in range(60_000)) + "\n")
    corpus = corpus_lib.open_corpus(str(tmp_path))
    assert (f"{tmp_path}: cut 2 blocks longer than 65,536 bytes into pieces of at most 16,384 "
            f"characters at line breaks or spaces (SentencePiece's longest sentence)"
            in capsys.readouterr().err)
    blocks = list(corpus.train) + list(corpus.eval)
    assert max(map(len, blocks)) <= corpus_lib.MAX_BLOCK_CHARS
    assert sum(len(b.split()) for b in blocks) == 120_000  # no word lost or split
    tokenizer = load_or_train_lm_tokenizer(blocks, str(tmp_path), vocab_size=400)  # lm.py's
    assert tokenizer.vocab_size > 300


def test_a_non_utf8_prompt_file_is_named(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"def f():\n caf\xe9\n")
    assert run_as_script(lambda: lm_experiment.read_prompts([f"@{tmp_path / 'prompts.txt'}"])) == 2
    assert one_error_line(capsys) == (
        f"{tmp_path / 'prompts.txt'}: not UTF-8 text (byte 0xe9 at offset 13); convert it, "
        f"e.g. `iconv -f latin1 -t utf-8`")


# --- data (item 7) ------------------------------------------------------------------------------

def test_tsv_trailing_blank_lines_are_accepted_but_not_inner_ones(tmp_path, capsys):
    (tmp_path / "a.tsv").write_text("one\teins\ntwo\tzwei\n\n  \n")
    assert list(TsvPairs(tmp_path / "a.tsv")) == [("one", "eins"), ("two", "zwei")]
    (tmp_path / "b.tsv").write_text("one\teins\n\ntwo\tzwei\n")
    assert run_as_script(lambda: TsvPairs(tmp_path / "b.tsv")) == 2
    assert one_error_line(capsys) == (f"{tmp_path / 'b.tsv'}:2: a blank line between sentence "
                                      f"pairs (only blank lines at the end of the file are "
                                      f"ignored)")


def test_a_vocab_size_the_text_cannot_support_is_shrunk_with_a_note(tmp_path, capsys):
    tokenizer = train_sentencepiece(["one two three four five six"] * 20, tmp_path / "t.model",
                                    vocab_size=100_000)
    out = capsys.readouterr().err.strip()
    assert out == (f"Tokenizer: {tokenizer.vocab_size:,} pieces instead of vocab_size = "
                   f"100,000: the training text supports no more (SentencePiece runs out of "
                   f"pieces to add; more text gives more), so the model's vocabulary has "
                   f"{tokenizer.vocab_size:,}")


def test_predict_on_a_directory_says_so(tmp_path, capsys):
    assert run_as_script(lambda: read_image_file(tmp_path, channels=1)) == 2
    assert one_error_line(capsys) == (
        f"{tmp_path} is a directory, not an image file; name its image files, comma-separated "
        f"(e.g. --predict={tmp_path / 'a.png'},{tmp_path / 'b.png'})")


def test_a_long_dalle_prompt_is_refused_in_words(capsys):
    prompts = DigitPrompts()
    assert run_as_script(lambda: prompts.encode(" ".join(["a"] * 120))) == 2
    assert one_error_line(capsys) == (
        f"prompt '{'a ' * 28}a...' has 120 words; prompts have at most {prompts.max_length} (the "
        f"model reads {prompts.max_length} text positions), e.g. 'a handwritten seven'")


# --- token ids the model cannot read (item 11) --------------------------------------------------

VOCAB = 5


def one_hot_step(tokens, cache):
    """Logits = one-hot rows of an embedding read like Flax reads it (NaN past the table)."""
    table = jnp.eye(VOCAB)
    return jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan), cache


def test_ids_outside_the_vocabulary_are_silent_under_jit_and_caught_in_checked_mode():
    greedy = jax.jit(lambda p: decoding.sample(one_hot_step, {}, p, 2, temperature=0.0))
    bad = jnp.array([[1, 7]])
    assert greedy(bad).shape == (1, 4)  # no error: the silent case
    with pytest.raises(checkify.JaxRuntimeError,
                       match=r"the prompt: token id 7 is outside the model's vocabulary \[0, 5\)"):
        decoding.checked(greedy)(bad)
    assert decoding.checked(greedy)(jnp.array([[1, 2]])).tolist() == [[1, 2, 2, 2]]
    with pytest.raises(DataError, match="token id 7 is outside"):
        decoding.sample(one_hot_step, {}, bad, 2, temperature=0.0)  # eager: before decoding


def test_lm_generation_refuses_ids_out_of_range_and_too_long_prompts_before_running(capsys):
    model = CausalLM(CausalLMConfig(vocab_size=16, max_len=8, num_layers=1, d_model=8,
                                    num_heads=2, d_ff=16))
    generate = functools.partial(generate_ids, model, None, num_tokens=2, temperature=0.0)
    assert run_as_script(lambda: generate([[2, 3], [2, 40]])) == 2
    assert one_error_line(capsys) == ("prompt 2: token id 40 is outside the model's vocabulary "
                                      "[0, 16) (ids made by another tokenizer?)")
    assert run_as_script(lambda: generate([list(range(2, 10))])) == 2
    assert one_error_line(capsys) == "prompt 1 has 8 tokens; max_len=8 leaves room for at most 7"
