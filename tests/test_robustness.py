"""Issue 14 as a user meets it: experiments/translate.py's failure cases, one table row each.

Every row runs the experiment in-process under the scripts' error handling
(``launch.user_errors``: one ``error:`` line, exit 2) and asserts the exit code, the
message and the workdir's files (sha256 of each) before and after. A refused run
leaves the workdir byte for byte as it was. One module-scope run trains the model the
rows resume, refuse or translate with: the default batch sizes (128 / 500) on the 8
simulated devices, a lone train file with a BOM, a header line and one outlier line.
The library's own rows (lock, Ctrl-C, checksums, best checkpoint, early stopping) are
in test_robustness_train.py.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

import scripts
import train_toy
from tfx_jax import train as tr
from tfx_jax.apps.translation import experiment as ex
from tfx_jax.apps.translation.data import open_data
from tfx_jax.train import launch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "translate.py"
WORDS = "red green blue black white pink gray gold".split()
OUTLIER = " ".join(["blue"] * 300)
OUTLIERS = [f"{OUTLIER} {word}\tblue" for word in WORDS[:3]]  # 3 of 303 pairs


def pairs(count: int) -> list[str]:
    lines = [f"{a} {b} {c}\t{c} {b} {a}" for a in WORDS for b in WORDS for c in WORDS]
    return lines[:count]


def tiny_config(tmp: Path, **overrides):
    config = scripts.experiment_config("translate")
    config.model.update(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=1)
    config.number_words.update(max_number=999, train_size=64, validation_size=8, test_size=8,
                               train_all_below=10)
    config.update(data_dir=str(tmp / "tfds"), vocab_size=40, num_train_steps=2,
                  schedule="constant", warmup_steps=0, log_every_steps=1, eval_every_steps=0,
                  checkpoint_every_steps=1, progress_bar=False, beam_size=1,
                  num_examples_to_print=1)
    for key, value in overrides.items():
        if key.startswith(("model.", "mesh.")):
            section, name = key.split(".")
            config[section][name] = value
        else:
            config[key] = value
    return config


def digests(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run(call: Callable[[], object]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``call()`` with the scripts' error handling."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with launch.user_errors():
                call()
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A spreadsheet export: BOM, header line, 300 pairs and three 300-word outliers."""
    path = tmp_path_factory.mktemp("data") / "corpus.tsv"
    lines = ["source\ttarget"] + pairs(100) + OUTLIERS + pairs(300)[100:]
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """The run every row builds on, and what it printed."""
    tmp = tmp_path_factory.mktemp("trained")
    train_toy.use_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
    config = tiny_config(tmp, train_data=str(corpus))
    sizes = ex.decide_sizes(config, 300, user_corpus=True)[0]  # the defaults
    assert (sizes["batch_size"], sizes["eval_batch_size"]) == (128, 500)
    workdir = tmp / "run"
    code, out, err = run(lambda: ex.train_and_test(config, str(workdir)))
    assert code == 0, err
    return workdir, out, err


def test_default_batch_sizes_on_8_devices_and_a_lone_messy_train_file(trained, corpus):
    workdir, out, err = trained
    # 1: the eval batch of 500 is padded to 504 for 8 devices, announced before training.
    assert "eval/test batches of 504 (config.eval_batch_size = 500 padded to a multiple of " \
           "the 8 devices" in err
    # 7: no eval_data: a held-out part of the user's file, said in a line (not number_words).
    assert f"no config.eval_data: held out 15 of 303 pairs of {corpus}" in err
    test = tr.read_metrics(str(workdir), "test")[-1]
    assert test["num_examples"] == 15 and test["step"] == 2
    # 8: the BOM and the header line are not trained on.
    assert f"{corpus}: removed the UTF-8 byte order mark" in err
    assert f"{corpus}: skipped the header line 'source\\ttarget'" in err
    # 9: one 300-word line does not set the row length; the cut is counted and warned about.
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["max_source_length"] <= 16 and saved["max_target_length"] <= 16
    train = open_data(tiny_config(workdir, train_data=str(corpus))).train
    cut = sum(source.startswith(OUTLIER) for source, _ in train)
    assert cut >= 1 and f"{cut} of 288 pairs are longer and are cut to fit. warning: " \
                        f"outliers up to 30" in err
    # packing "auto": this file's lengths spread, so rows are packed and an epoch counts pairs
    assert "packing on, 1.4 examples per row (config.packing = 'auto'" in err
    assert "training length: 2 steps of 128 rows of ~1.4 pairs = 1.25 epochs of 288 pairs" in err
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "metrics.jsonl",
                                           "sentencepiece_bpe_40_split_digits.model",
                                           "tensorboard"]  # lock released
    assert saved["eval_batch_size"] == 500  # the config as given; 504 is the padded shape


def test_a_lone_file_splits_the_same_way_and_drops_header_and_bom(tmp_path, corpus):
    data = open_data(tiny_config(tmp_path, train_data=str(corpus)))
    assert len(data.train) + len(data.eval) == 303 and data.test is data.eval
    every = list(data.train) + list(data.eval)
    assert ("source", "target") not in every
    assert all(not s.startswith("\ufeff") for s, _ in every)
    assert ("red red red", "red red red") in every  # the first pair after the header


@pytest.mark.parametrize("first_line, header, skipped", [
    ("source\ttarget", "auto", True), ("EN\tDE", "auto", True), ("src_text\ttgt_text", "auto", True),
    ("en\tred", "auto", False), ("gold\tred", "auto", False), ("source\ttarget", "keep", False),
    ("gold\tred", "skip", True)])
def test_header_lines_are_detected_and_can_be_forced(tmp_path, first_line, header, skipped):
    path = tmp_path / "corpus.tsv"
    path.write_text(first_line + "\n" + "\n".join(pairs(40)) + "\n")
    config = tiny_config(tmp_path, train_data=str(path), eval_data=str(path), tsv_header=header)
    data = open_data(config)
    assert len(data.train) == (40 if skipped else 41)
    assert any("skipped the header line" in note for note in data.notes) == skipped


@pytest.mark.parametrize("name", ["corpus.txt", "corpus.TSV", "corpus"])
def test_files_are_recognised_by_existence_not_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n".join(pairs(40)) + "\n")
    data = open_data(tiny_config(tmp_path, train_data=str(path), eval_data=str(path)))
    assert len(data.train) == len(data.eval) == 40 and data.user_corpus


@dataclasses.dataclass
class Refusal:
    id: str
    overrides: dict
    message: str  # the whole stderr is one line: "error: " + a string containing this
    on_trained_copy: bool = False  # else a fresh workdir (that must not come to exist)
    damage: Optional[Callable[[Path], None]] = None
    workdir_is_file: bool = False


def truncate_metadata(workdir: Path) -> None:
    for step in ("1", "2"):
        (workdir / "checkpoints" / step / "state" / "_METADATA").write_bytes(b'{"tree_meta')


def lm_workdir(workdir: Path) -> None:
    """A workdir that experiments/lm.py made (its config.json)."""
    workdir.mkdir(parents=True, exist_ok=True)
    lm = scripts.experiment_config("lm")
    (workdir / "config.json").write_text(lm.to_json_best_effort())


REFUSALS = [
    Refusal("batch_size_0", dict(batch_size=0),
            "config.batch_size must be a positive integer, got 0"),
    Refusal("negative_steps", dict(num_train_steps=-5),
            "config.num_train_steps must be a non-negative integer (0 = from the data), got -5"),
    Refusal("nan_learning_rate", dict(learning_rate=math.nan),
            "config.learning_rate must be a positive number, got nan"),
    Refusal("heads_do_not_divide_d_model", {"model.num_heads": 3},
            "TransformerConfig.d_model=16 is not divisible by num_heads=3"),
    Refusal("unknown_model_key", {"model.num_layer": 2},
            "config.model has keys ['num_layer'] that TransformerConfig does not know"),
    Refusal("eval_batch_size_0", dict(eval_batch_size=0),
            "config.eval_batch_size must be a positive integer, got 0"),
    Refusal("epochs_and_steps", dict(num_epochs=2.0, num_train_steps=10),
            "set one of config.num_epochs (2.0) and config.num_train_steps (10), not both"),
    Refusal("batch_not_divisible_by_8_devices", dict(batch_size=12),
            "config.batch_size = 12 must be divisible by the number of devices in the mesh (8)"),
    Refusal("eval_data_without_train_data", dict(eval_data="eval.tsv", train_data=""),
            "config.eval_data is set but config.train_data is not"),
    Refusal("missing_train_file", dict(train_data="missing.txt"),
            "TSV parallel corpus not found: missing.txt"),
    Refusal("workdir_is_a_file", {}, "is a file, not a directory", workdir_is_file=True),
    Refusal("d_model_changed_on_resume", {"model.d_model": 32},
            "does not match the model", on_trained_copy=True),
    Refusal("vocab_changed_on_resume", dict(vocab_size=48),
            "does not match the model", on_trained_copy=True),
    Refusal("truncated_checkpoint", {}, "cannot read the checkpoint at step 2",
            on_trained_copy=True, damage=truncate_metadata),
    # issue 23: what the config alone decides is refused before any data is read
    Refusal("mesh_tensor_does_not_divide_the_heads", {"mesh.tensor": 4, "mesh.data": 2},
            "size 2) is split over mesh axis tensor of size 4, which does not divide it"),
    Refusal("workdir_of_another_script", {}, "holds a run of experiments/lm.py (config.json), "
            "not of experiments/translate.py", damage=lm_workdir),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[case.id for case in REFUSALS])
def test_refused_runs_say_one_line_exit_2_and_leave_the_workdir_as_it_was(case, tmp_path,
                                                                          trained, corpus):
    workdir = tmp_path / "run"
    if case.on_trained_copy:
        shutil.copytree(trained[0], workdir)
    if case.damage:
        case.damage(workdir)
    if case.workdir_is_file:
        workdir.write_text("not a directory")
    before = digests(workdir)
    config = tiny_config(tmp_path, **{"train_data": str(corpus), **case.overrides})
    code, _, err = run(lambda: ex.train_and_test(config, str(workdir)))
    lines = err.strip().splitlines()
    assert code == 2, err
    assert lines[-1].startswith("error: ") and case.message in lines[-1], err
    # Before the error only the notes of data preparation (held-out split, header, lengths).
    assert all(not line.startswith(("error", "Traceback")) for line in lines[:-1]), err
    assert digests(workdir) == before  # nothing written, nothing removed, no lock left


def test_rerunning_a_finished_workdir_does_not_test_again_and_keeps_config_json(
        tmp_path, trained, corpus):
    """Issue 23: a rerun of a finished run neither decodes the test split again nor appends
    a second test line; fewer steps than the checkpoint's says so and rewrites nothing."""
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    before = digests(workdir)
    for steps, said in ((2, "Nothing to train: the checkpoint is at step 2 = "
                            "config.num_train_steps"),
                        (1, "Nothing to train: config.num_train_steps = 1 is below the "
                            "checkpoint's step 2; config.json is kept")):
        config = tiny_config(tmp_path, train_data=str(corpus), num_train_steps=steps)
        code, out, err = run(lambda: ex.train_and_test(config, str(workdir)))
        assert code == 0, err
        assert said in err and "The test at step 2 is in" in err and "not repeated" in err
        assert "Example translations" not in out
        assert len(tr.read_metrics(str(workdir), "test")) == 1
        after = digests(workdir)
        kept = [path for path in before if path.startswith(("config.json", "checkpoints/"))]
        assert kept and all(after[path] == before[path] for path in kept)


def test_translating_with_a_workdir_of_another_script_names_it(tmp_path):
    lm_workdir(tmp_path / "lm")
    code, _, err = run(lambda: ex.load_translator(str(tmp_path / "lm")))
    assert code == 2 and err.strip().splitlines() == [
        f"error: workdir '{tmp_path / 'lm'}' holds a run of experiments/lm.py (config.json), "
        f"not of experiments/translate.py; use a workdir of experiments/translate.py or a new "
        f"--workdir"]


def test_held_out_split_needs_enough_pairs(tmp_path):
    path = tmp_path / "small.tsv"
    path.write_text("\n".join(pairs(30)) + "\n")
    code, _, err = run(lambda: ex.train_and_test(tiny_config(tmp_path, train_data=str(path)),
                                                 str(tmp_path / "run")))
    assert code == 2
    assert err.strip() == (f"error: config.train_data {path} has 30 pairs and no "
                           f"config.eval_data was given: 5% of them (2) is too few to hold out "
                           f"for evaluation; pass --config.eval_data=FILE (or raise "
                           f"config.eval_holdout)")
    assert not (tmp_path / "run").exists()


def test_translate_gives_one_line_per_input_line_and_warns_when_it_cuts(trained, tmp_path,
                                                                          monkeypatch):
    workdir = trained[0]
    before = digests(workdir)
    script = scripts.load_script(str(SCRIPT), "translate_script")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"red blue\n\n{OUTLIER}\n\n"))
    code, out, err = run(lambda: script.translate(tiny_config(tmp_path), str(workdir),
                                                  ["gold", "-", "pink"]))
    assert code == 0
    lines = out.split("\n")[:-1]
    assert len(lines) == 6  # gold, red blue, (blank), outlier, (blank), pink
    assert lines[2] == "" and lines[4] == "" and all(lines[i] for i in (0, 1, 3, 5))
    assert err.startswith("warning: input 4 has 30") and "only its first" in err
    assert len(err.strip().splitlines()) == 1
    assert digests(workdir) == before  # translating writes nothing


def test_translate_on_an_empty_workdir_is_one_line_and_creates_nothing(tmp_path):
    script = scripts.load_script(str(SCRIPT), "translate_script")
    code, _, err = run(lambda: script.translate(tiny_config(tmp_path), str(tmp_path / "none"),
                                                ["gold"]))
    assert code == 2 and err.startswith(f"error: no trained model in workdir '{tmp_path}/none'")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("overrides, pairs_count, user, steps, line", [
    (dict(), 55_000, False, 600, "600 steps of 128 = 1.40 epochs of 55000 pairs (default for "
                                 "number_words)"),
    (dict(), 100_000, True, 7813, "7813 steps of 128 = 10.00 epochs of 100000 pairs (default "
                                  "for a user corpus: 10 epochs"),
    (dict(), 2_000, True, 1000, "1000 steps of 128 = 64.00 epochs of 2000 pairs"),
    (dict(num_epochs=2.5), 10_000, True, 196, "196 steps of 128 = 2.51 epochs of 10000 pairs "
                                              "(config.num_epochs = 2.5)"),
    (dict(num_train_steps=50, grad_accum_steps=4), 10_000, True, 52, "52 steps of 128"),
], ids=["number_words", "user_corpus", "small_user_corpus", "epochs", "steps_round_to_accum"])
def test_training_length_follows_the_data(tmp_path, overrides, pairs_count, user, steps, line):
    config = tiny_config(tmp_path, **{"num_train_steps": 0, **overrides})
    sized = tr.freeze(config, ex.JOB, **ex.decide_sizes(config, pairs_count, user)[0])
    resolved, said = ex.resolve_train_length(sized, pairs_count, user)
    assert resolved == steps and config.num_train_steps == overrides.get("num_train_steps", 0)
    assert said.startswith("training length: ") and line in said


def test_an_epoch_of_packed_rows_is_one_pass_over_the_pairs(tmp_path):
    config = tiny_config(tmp_path, num_train_steps=0, num_epochs=2.0)
    sized = tr.freeze(config, ex.JOB, **ex.decide_sizes(config, 10_000, True)[0])
    steps, said = ex.resolve_train_length(sized, 10_000, True, pairs_per_row=2.5)
    assert steps == 63  # ceil(2 * 10,000 / (128 rows * 2.5 pairs))
    assert "63 steps of 128 rows of ~2.5 pairs = 2.02 epochs of 10000 pairs" in said


def _script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_command_line_errors_are_one_line_exit_2_and_verbosity_shows_the_traceback(tmp_path):
    result = _script(f"--workdir={tmp_path / 'a'}", "--config.num_train_step=5")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: unknown config key 'num_train_step' Did you mean "
                                     "\"num_train_steps\" instead of \"num_train_step\"? (in a "
                                     "--config.KEY=VALUE flag)")
    # (Without --verbosity the same error is the one line of the in-process table above.)
    result = _script(f"--workdir={tmp_path / 'c'}", "--config.batch_size=0", "--verbosity=1")
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert not any((tmp_path / name).exists() for name in "abc")


class WordTokenizer:
    """One token per word (lengths are then easy to state)."""

    def encode(self, text):
        return text.split()


@pytest.mark.parametrize("source_words, cap, longer", [
    ([3] * 99 + [1000], 4, 1),           # one outlier among 100: cut, counted
    ([3] * 50 + [6] * 50, 7, 0),         # within 2x of the 99th percentile: all kept
    ([3] * 298 + [2000, 1000], 4, 2),    # two outliers among 300
    ([5], 6, 0),
], ids=["one_outlier", "no_outlier", "two_outliers", "one_pair"])
def test_length_caps_cut_outliers_only(source_words, cap, longer):
    from tfx_jax.data.length_caps import length_caps
    data = [(" ".join(["w"] * n), "t t") for n in source_words]
    caps = length_caps(data, WordTokenizer())
    assert (caps.max_source_length, caps.max_target_length, caps.num_longer) == (cap, 3, longer)
    assert caps.longest_source == max(source_words) + 1
    assert f"{longer} of {len(data)} pairs are longer" in caps.describe()
    assert ("warning: outliers" in caps.describe()) == bool(longer)
