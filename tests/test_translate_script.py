"""experiments/translate.py end to end on tiny configs: each data source, the translate
command, and clear errors for bad data and empty workdirs. The script is thin: the run
is tfx_jax.apps.translation.experiment (failure cases: test_robustness.py)."""
import io
import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

import scripts
import train_toy
from tfx_jax import train as tr
from tfx_jax.apps.translation import experiment
from tfx_jax.apps.translation.data import bleu_tokenize, open_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "translate.py")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """The script as a module.

    The tiny configs below give every data source the same shapes (vocabulary 40,
    rows of 12), so after the first run the others load their compiled programs
    from JAX's persistent cache.
    """
    train_toy.use_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
    return scripts.load_script(SCRIPT, "translate_script")


def tiny_config(data_dir, **overrides):
    config = scripts.experiment_config("translate")
    config.model.update(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=1)
    config.number_words.update(max_number=999, train_size=64, validation_size=8, test_size=8,
                               train_all_below=10)
    config.update(data_dir=str(data_dir), vocab_size=40, max_source_length=12,
                  max_target_length=12, batch_size=8, eval_batch_size=8,
                  num_train_steps=2, schedule="constant", warmup_steps=0, log_every_steps=1,
                  eval_every_steps=0, checkpoint_every_steps=0, progress_bar=False,
                  beam_size=1, num_examples_to_print=2)
    config.update(overrides)
    return config


def _splits(workdir):
    return [record["split"] for record in tr.read_metrics(str(workdir))]


@pytest.mark.slow
def test_number_words_trains_tests_and_translates(script, tmp_path, capsys):
    config = tiny_config(tmp_path / "tfds", beam_size=2)
    workdir = str(tmp_path / "run")
    result = experiment.train_and_test(config, workdir, open_data(config))
    assert _splits(workdir) == ["train", "train", "eval", "test"]
    train, _, evaluation, test = tr.read_metrics(workdir)
    assert train["step"] == 1 and test["step"] == 2 and test["num_examples"] == 8
    for record in (evaluation, test):
        assert 0.0 <= record["exact_match"] <= 1.0 and 0.0 <= record["bleu"] <= 100.0
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["d_model"] == 16 and saved["vocab_size"] == 40
    out = capsys.readouterr().out
    assert "Example translations" in out and "test" in out
    # The translate command restores params + tokenizer and beam-decodes like the test.
    sources = result["sources"][:3]
    script.translate(config, workdir, sources)
    assert capsys.readouterr().out.splitlines() == result["hypotheses"][:3]


@pytest.mark.slow
def test_tsv_corpus_trains_with_only_the_data_flags(script, tmp_path):
    words = "red green blue black white pink gray gold".split()
    lines = [f"{a} {b} {c}\t{c} {b} {a}" for a in words for b in words for c in words[:2]]
    (tmp_path / "train.tsv").write_text("\n".join(lines[:100]) + "\n")
    (tmp_path / "eval.tsv").write_text("\n".join(lines[100:112]) + "\n")
    config = tiny_config(tmp_path / "tfds", train_data=str(tmp_path / "train.tsv"),
                         eval_data=str(tmp_path / "eval.tsv"))
    workdir = str(tmp_path / "run")
    experiment.train_and_test(config, workdir, open_data(config))
    assert _splits(workdir)[-2:] == ["eval", "test"]
    assert tr.read_metrics(workdir, "test")[0]["num_examples"] == 12  # tested on eval.tsv
    assert bleu_tokenize(config) == "13a"


@pytest.mark.slow
def test_tfds_translation_dataset_trains(script, tmp_path):
    config = tiny_config(tmp_path / "tfds", dataset="wmt14_translate/de-en",
                         source_language="en", target_language="de",
                         data_in_memory=False)  # read lazily through tfds.data_source
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=16):
        data = open_data(config)
        assert len(data.train) == 16
        experiment.train_and_test(config, str(tmp_path / "run"), data)
    assert _splits(str(tmp_path / "run"))[-1] == "test"


def _run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)


def test_bad_tsv_line_and_empty_workdir_fail_clearly(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("one\teins\ntwo\tzwei\nthree drei\n")
    result = _run_script(f"--workdir={tmp_path / 'run'}", f"--config.train_data={bad}",
                         f"--config.eval_data={bad}")
    assert result.returncode == 2
    assert f"error: {bad}:3: expected 'source<TAB>target'" in result.stderr
    result = _run_script(f"--workdir={tmp_path / 'empty'}", "--translate=twenty one")
    assert result.returncode == 2
    assert "no trained model in workdir" in result.stderr
    assert not os.path.exists(tmp_path / "empty")  # nothing created by a failed lookup
