"""experiments/lm.py and its library (tfx_jax/apps/language_model/experiment.py) end to end on
tiny configs: one real step per data source (the built-in stdlib corpus, mock lm1b), the
packing decision, resuming, speed metrics in metrics.jsonl, --generate (prompt files,
stdin), and one-line errors."""
import contextlib
import io
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.scripts import experiment_config
from tfx_jax import train as tr
from tfx_jax.apps.language_model import experiment

pytestmark = pytest.mark.slow  # end-to-end runs (small, still part of CI)
ROOT = pathlib.Path(__file__).resolve().parent.parent
TOKENIZER = "sentencepiece_lm_bpe_400.model"


def one_device_mesh():
    return tr.make_data_mesh(jax.devices()[:1])


def tiny_config(**overrides):
    """1 layer, d_model 16; rows of 128 (the default config's) over the first 40 stdlib files.

    A constant learning rate, so that the first 2 steps of a 4-step run are a
    2-step run (the resume test stops and reruns on the same schedule).
    """
    config = experiment_config("lm")
    config.model.update(num_layers=1, d_model=16, num_heads=2, d_ff=32, num_kv_heads=1,
                        position="rope")
    config.update(max_files=40, vocab_size=400, tokenizer_max_chars=30_000, max_len=128,
                  max_eval_examples=8, batch_size=4, eval_batch_size=4, num_train_steps=4,
                  schedule="constant", warmup_steps=0, log_every_steps=1,
                  eval_every_steps=0, checkpoint_every_steps=2, progress_bar=False,
                  sample_prompts=(), num_generate_tokens=6, peak_tflops=1.0,
                  eval_fraction=0.1)
    config.update(overrides)
    return config


def _check_metrics(workdir, steps):
    train = tr.read_metrics(str(workdir), "train")
    evaluation = tr.read_metrics(str(workdir), "eval")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert evaluation[-1]["step"] == steps
    for record in train:
        for key in ("tokens_per_sec", "examples_per_sec", "mfu", "loss"):
            assert record[key] > 0, (key, record)
        assert record["tokens_per_sec"] > record["examples_per_sec"]
    last = evaluation[-1]
    assert last["perplexity"] == pytest.approx(math.exp(last["loss"]), rel=1e-6)
    assert 0 <= last["accuracy"] <= 1 and last["num_tokens"] > 0


def _train(config, workdir):
    """experiment.train; returns what it said on stderr."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        experiment.train(config, str(workdir), mesh=one_device_mesh())
    return said.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps straight (checkpoints at 2 and 4): (workdir, startup lines)."""
    workdir = tmp_path_factory.mktemp("lm_stdlib")
    return workdir, _train(tiny_config(), workdir)


def test_stdlib_corpus_trains_packed_with_speed_metrics(trained):
    workdir, said = trained
    _check_metrics(workdir, 4)
    assert TOKENIZER in os.listdir(workdir)
    # stdlib blocks leave ~half of a 128-token row padding: "auto" packs
    line = next(x for x in said.splitlines() if "padding" in x)
    assert line.startswith("python_stdlib: padding ") and "packing on" in line, said
    assert "config.packing = 'auto': the gain is at least 1.25x" in line


def test_packing_false_gives_unpacked_rows(trained):
    workdir, _ = trained
    config = tiny_config(packing="false")
    ready = experiment.prepare(config, str(workdir))  # reads the workdir, writes nothing
    assert not ready.packing.enabled and ready.packing.gain >= 1.25  # off though it would pay
    assert "packing off (config.packing = false)" in ready.packing.report("x")
    batch = next(experiment.make_train_batches(config, ready.corpus, ready.tokenizer,
                                               packing=ready.packing.enabled))
    assert "inputs_segmentation" not in batch and batch["inputs"].shape == (4, 128)
    for inputs, targets in zip(batch["inputs"], batch["targets"]):  # one example per row
        assert (inputs == 2).sum() <= 1 and (targets == 1).sum() <= 1  # <= one BOS, one EOS


def test_resume_through_the_script_matches_a_straight_run(trained, tmp_path):
    straight, _ = trained
    workdir = tmp_path / "resumed"
    workdir.mkdir()
    shutil.copy(straight / TOKENIZER, workdir / TOKENIZER)  # the same tokenizer, not retrained
    _train(tiny_config(num_train_steps=2), workdir)
    said = _train(tiny_config(num_train_steps=4), workdir)
    assert "packing on" in said
    losses = {r["step"]: r["loss"] for r in tr.read_metrics(str(workdir), "train")}
    expected = {r["step"]: r["loss"] for r in tr.read_metrics(str(straight), "train")}
    assert sorted(losses) == [1, 2, 3, 4]
    for step in (3, 4):  # the resumed steps saw the same packed rows as the straight run
        assert losses[step] == pytest.approx(expected[step], rel=1e-6), (step, losses, expected)
    resumed_params = experiment.load_trained_lm(str(workdir)).params
    straight_params = experiment.load_trained_lm(str(straight)).params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 resumed_params, straight_params)


def test_mock_lm1b_trains_a_step(tmp_path):
    config = tiny_config(dataset="lm1b", packing="false", data_dir=str(tmp_path / "tfds"),
                         profile_steps="2,2", max_len=32, num_train_steps=2,
                         checkpoint_every_steps=0,
                         model=dict(position="learned", num_kv_heads=None, num_layers=1,
                                    d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0))
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=24):
        experiment.train(config, str(tmp_path / "run"), mesh=one_device_mesh())
    _check_metrics(tmp_path / "run", 2)
    traces = [f for _, _, files in os.walk(tmp_path / "run" / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces  # --config.profile_steps


def test_profile_steps_values():
    from tfx_jax.train.perf import parse_profile_steps
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


def test_generate_prompt_files_stdin_and_order(trained, tmp_path, capsys):
    workdir, _ = trained
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("def f(x):\\n    return\n\nimport\nclass \\\\A\n")
    prompts = experiment.read_prompts([f"@{prompts_file}", "x =", "-"],
                                      stdin=io.StringIO("for i in\n"))
    assert prompts == ["def f(x):\n    return", "import", "class \\A", "x =", "for i in"]
    samples = experiment.generate(tiny_config(num_samples=2, top_k=5, top_p=0.9),
                                  str(workdir), prompts)
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert headers == [f"--- sample {i} of {p!r}" for p in prompts for i in (1, 2)]
    for prompt, texts in zip(prompts, samples):
        assert len(texts) == 2 and all(t.startswith(prompt) for t in texts)


def _one_line_exit_2(capsys, fn, *args):
    with pytest.raises(SystemExit) as exit_info, tr.launch.user_errors():
        fn(*args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_generate_errors_are_one_line(trained, tmp_path, capsys):
    workdir, _ = trained
    config = tiny_config()
    (tmp_path / "empty.txt").write_text("\n\n")
    run = lambda specs: experiment.generate(config, str(workdir),  # noqa: E731
                                            experiment.read_prompts(specs))
    assert "no prompt file" in _one_line_exit_2(capsys, run, [f"@{tmp_path / 'missing.txt'}"])
    assert "gave no prompts" in _one_line_exit_2(capsys, run, [f"@{tmp_path / 'empty.txt'}"])
    line = _one_line_exit_2(capsys, run, ["def", "x = 1\n" * 100])
    assert "prompt 2 'x = 1" in line and "max_len=128" in line
    line = _one_line_exit_2(capsys, experiment.generate, tiny_config(top_p=0.0), str(workdir),
                            ["def"])
    assert "config.top_p must be in (0, 1]" in line
    assert "no config.json" in _one_line_exit_2(capsys, experiment.generate, config,
                                                str(tmp_path / "missing"), ["def"])


def test_refused_configs_write_nothing(tmp_path):
    workdir = tmp_path / "w"
    for key, value, match in (("max_len", 1, "config.max_len must be an integer >= 2"),
                              ("batch_size", 0, "config.batch_size"),
                              ("vocab_size", 100, "config.vocab_size must be"),
                              ("packing", "maybe", "config.packing must be"),
                              ("num_samples", 0, "config.num_samples must be")):
        with pytest.raises(ValueError, match=match):
            experiment.train(tiny_config(**{key: value}), str(workdir), mesh=one_device_mesh())
    assert not workdir.exists()


def test_a_resume_on_another_dataset_or_a_workdir_of_another_script_is_refused(trained,
                                                                             tmp_path):
    """Issue 23: resuming on other data would continue with the old tokenizer and rewrite
    config.json; a translate workdir is named as such. Both before any data is read."""
    import hashlib
    import shutil
    from tfx_jax.errors import WorkdirError

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    workdir = tmp_path / "copy"
    shutil.copytree(trained[0], workdir)
    before = digests(workdir)
    other = tmp_path / "texts"
    other.mkdir()
    with pytest.raises(WorkdirError, match="was trained with config.dataset = 'python_stdlib', "
                                           "this run has '.*texts'"):
        experiment.train(tiny_config(dataset=str(other)), str(workdir), mesh=one_device_mesh())
    assert digests(workdir) == before
    translate = tmp_path / "translate"
    translate.mkdir()
    (translate / "config.json").write_text(experiment_config("translate").to_json_best_effort())
    with pytest.raises(WorkdirError, match="holds a run of experiments/translate.py"):
        experiment.train(tiny_config(), str(translate), mesh=one_device_mesh())
    with pytest.raises(WorkdirError, match="holds a run of experiments/translate.py"):
        experiment.generate(tiny_config(), str(translate), ["def"])
    assert sorted(p.name for p in translate.iterdir()) == ["config.json"]


def test_script_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    empty = tmp_path / "empty_corpus"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "lm.py"), f"--workdir={tmp_path / 'w'}",
         f"--config.dataset={empty}"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        "error: empty corpus"), done.stderr[-2000:]
