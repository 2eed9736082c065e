"""experiments/lm.py end to end on tiny configs: one real step per data source (the built-in
stdlib corpus, mock lm1b), speed metrics in metrics.jsonl, --generate, and clear errors."""
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest
import tensorflow_datasets as tfds

from tests.scripts import experiment_config, load_script
from tfx_jax import train as tr

pytestmark = pytest.mark.slow  # end-to-end runs (small, still part of CI)
ROOT = pathlib.Path(__file__).resolve().parent.parent
lm_script = load_script(str(ROOT / "experiments" / "lm.py"), "lm_experiment")


def one_device_mesh():
    return tr.make_data_mesh(jax.devices()[:1])


def tiny_config(**overrides):
    config = experiment_config("lm")
    config.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32, num_kv_heads=1,
                        position="rope")
    config.update(max_files=40, vocab_size=400, tokenizer_max_chars=30_000, max_len=32,
                  max_eval_examples=8, batch_size=4, eval_batch_size=4, num_train_steps=2,
                  warmup_steps=1, log_every_steps=1, eval_every_steps=0,
                  checkpoint_every_steps=0, progress_bar=False, sample_prompts=(),
                  num_generate_tokens=6, peak_tflops=1.0, eval_fraction=0.1)
    config.update(overrides)
    return config


def _check_metrics(workdir):
    train = tr.read_metrics(str(workdir), "train")
    evaluation = tr.read_metrics(str(workdir), "eval")
    assert [r["step"] for r in train] == [1, 2] and evaluation[-1]["step"] == 2
    for record in train:
        for key in ("tokens_per_sec", "examples_per_sec", "mfu", "loss"):
            assert record[key] > 0, (key, record)
        assert record["tokens_per_sec"] > record["examples_per_sec"]
    last = evaluation[-1]
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]), rel=1e-6)
    assert 0 <= last["accuracy"] <= 1 and last["num_tokens"] > 0


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm_stdlib")
    lm_script.train(tiny_config(), str(workdir), mesh=one_device_mesh())
    return workdir


def test_stdlib_corpus_trains_packed_with_speed_metrics(trained_workdir):
    _check_metrics(trained_workdir)
    assert any(f.startswith("sentencepiece_lm_bpe_400") for f in os.listdir(trained_workdir))


def test_mock_lm1b_trains_a_step(tmp_path):
    config = tiny_config(dataset="lm1b", packing="false", data_dir=str(tmp_path / "tfds"),
                         profile_steps="2,2",
                         model=dict(position="learned", num_kv_heads=None, num_layers=1,
                                    d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0))
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=24):
        lm_script.train(config, str(tmp_path / "run"), mesh=one_device_mesh())
    _check_metrics(tmp_path / "run")
    traces = [f for _, _, files in os.walk(tmp_path / "run" / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces  # --config.profile_steps


def test_profile_steps_values():
    from tfx_jax.train.throughput import parse_profile_steps
    assert parse_profile_steps("", 0) is None and parse_profile_steps(0, 0) is None
    assert parse_profile_steps("10,15", 0) == (10, 15)
    assert parse_profile_steps("3", 100) == (102, 104)  # 3 steps after the compiling one
    for bad in ("15,10", "a,b", "-2", "1,2,3"):
        with pytest.raises(ValueError, match="config.profile_steps must be"):
            parse_profile_steps(bad, 0)
    config = tr.default_config()  # the run config refuses a bad window before any work
    config.profile_steps = "15,10"
    with pytest.raises(ValueError, match="config.profile_steps must be"):
        tr.validate_config(config)


def test_generate_on_a_trained_workdir_and_its_errors(trained_workdir, capsys):
    config = tiny_config(num_samples=2, top_k=5, top_p=0.9)
    lm_script.generate(config, str(trained_workdir), ["def f(x):", "import"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 4 and "def f(x):" in out
    with pytest.raises(ValueError, match=r"longer than the model's context allows \(max_len=32"):
        lm_script.generate(config, str(trained_workdir), ["x = 1\n" * 40])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lm_script.generate(config, str(trained_workdir / "missing"), ["def"])


def test_script_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    empty = tmp_path / "empty_corpus"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "lm.py"), f"--workdir={tmp_path / 'w'}",
         f"--config.dataset={empty}"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        "error: empty corpus"), done.stderr[-2000:]
