"""config.model_size: the translation model, vocabulary and schedule sized from the data.

The rule (tfx_jax.apps.translation.experiment.size_for / decide_sizes) at its boundaries;
number_words keeps the model and schedule it had before the rule; a value the user sets
wins; a bad model_size is one ConfigError line before any data is read; config.json holds
the decided values and a rerun on the same data decides the same.
"""
import importlib.util
import json
import os

import pytest

import scripts
import train_toy
from tfx_jax import train as tr
from tfx_jax.apps.translation import experiment as ex
from tfx_jax.apps.translation.data import open_data
from tfx_jax.errors import ConfigError

# experiments/configs/translate.py before config.model_size (commit b2b67e0): the values
# the README job's test exact match 0.9925 was measured with
NUMBER_WORDS_BEFORE = {"model.d_model": 128, "model.num_heads": 4, "model.num_encoder_layers": 2,
                       "model.num_decoder_layers": 2, "model.d_ff": 512,
                       "model.dropout_rate": 0.1, "vocab_size": 1000, "batch_size": 128,
                       "learning_rate": 1e-3, "warmup_steps": 100, "eval_batch_size": 500}


def default_config():
    return scripts.experiment_config("translate")


@pytest.mark.parametrize("pairs, user_corpus, size", [
    (100, True, "tiny"), (19_999, True, "tiny"), (20_000, True, "small"),
    (160_239, True, "small"), (999_999, True, "small"), (1_000_000, True, "base"),
    (4_500_000, True, "base"), (55_000, False, "tiny"), (5_000_000, False, "tiny")])
def test_the_rule_at_its_boundaries(pairs, user_corpus, size):
    assert ex.size_for(pairs, user_corpus) == size


def test_number_words_keeps_the_model_and_schedule_it_had():
    config = default_config()
    sizes, line = ex.decide_sizes(config, 55_000, user_corpus=False)
    assert sizes == NUMBER_WORDS_BEFORE
    assert line.startswith("model: 'tiny' (2+2 layers, d_model 128, d_ff 512, 4 heads, "
                           "dropout 0.1, vocabulary <= 1,000, batch 128, learning rate 0.001, "
                           "warm-up 100, decoding batch 500) for number_words "
                           "(config.model_size = 'auto'")
    # the rest of the plan is the config file's, untouched by the sizes
    plan = tr.freeze(config, ex.JOB, **sizes)
    assert (plan.model.attention_dropout_rate, plan.schedule, plan.label_smoothing) == (
        0.0, "warmup_cosine", 0.1)


def test_a_user_corpus_gets_the_size_of_its_pairs():
    sizes, line = ex.decide_sizes(default_config(), 74_235, user_corpus=True)
    assert (sizes["model.num_encoder_layers"], sizes["model.d_model"], sizes["model.d_ff"],
            sizes["model.num_heads"], sizes["model.dropout_rate"]) == (6, 512, 1024, 4, 0.3)
    assert (sizes["vocab_size"], sizes["learning_rate"], sizes["warmup_steps"],
            sizes["eval_batch_size"]) == (10_000, 5e-4, 4000, 100)
    assert line.startswith("model: 'small' (6+6 layers, d_model 512, d_ff 1024, 4 heads, "
                           "dropout 0.3, ")
    assert "for 74,235 training pairs (config.model_size = 'auto'" in line


def test_explicit_values_win_over_the_rule_and_a_named_size():
    config = default_config()
    config.model.d_model = 256
    config.vocab_size = 8000
    config.learning_rate = 3e-4
    for model_size, pairs, name in (("auto", 2_000_000, "base"), ("small", 10, "small")):
        config.model_size = model_size
        sizes, line = ex.decide_sizes(config, pairs, user_corpus=True)
        assert not {"model.d_model", "vocab_size", "learning_rate"} & set(sizes)
        assert sizes["model.d_ff"] == ex.MODEL_SIZES[name].d_ff
        assert line.startswith(f"model: {name!r}")
        assert line.endswith("kept your config.model.d_model = 256, config.vocab_size = 8000, "
                             "config.learning_rate = 0.0003")
        plan = tr.freeze(config, ex.JOB, **sizes)
        assert (plan.model.d_model, plan.vocab_size, plan.learning_rate) == (256, 8000, 3e-4)


def test_a_bad_model_size_is_one_line_before_any_data(tmp_path):
    config = default_config()
    config.model_size = "huge"
    config.train_data = str(tmp_path / "never_read.tsv")  # no such file: not opened
    with pytest.raises(ConfigError) as error:
        ex.check(config, tr.make_mesh(config.mesh))
    assert str(error.value) == ("config.model_size must be 'auto' or one of ('tiny', 'small', "
                                "'base'), got 'huge'")


def test_a_decided_warmup_is_cut_to_a_fifth_of_the_run_an_explicit_one_is_not():
    sizes = ex.decide_sizes(default_config(), 50_000)[0]
    cut, note = ex.cut_warmup(sizes, 3000)
    assert (sizes["warmup_steps"], cut["warmup_steps"]) == (4000, 600)  # "small"'s, cut
    assert note.startswith("warm-up: 600 of the 3000 training steps (a fifth: the model "
                           "size's 4000 do not fit")
    assert ex.cut_warmup(sizes, 20_000) == (sizes, None)
    config = default_config()
    config.num_train_steps = 50  # "tiny"'s 100 warm-up steps do not fit: cut, accepted
    mesh = tr.make_mesh(config.mesh)
    ex.check(config, mesh)
    config.warmup_steps = 100  # set by the user: kept, and refused
    with pytest.raises(ConfigError, match="config.warmup_steps must be smaller than the "
                                          "number of optimizer updates"):
        ex.check(config, mesh)


def test_config_json_holds_the_decided_sizes_and_a_rerun_decides_the_same(tmp_path, capsys):
    train_toy.use_compilation_cache(tmp_path / "jax_cache")
    words = "red green blue black white pink gray gold".split()
    lines = [f"{a} {b}\t{b} {a}" for a in words for b in words] * 2
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    config = default_config()
    config.model.update(d_model=16, num_heads=2, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=1)  # explicit (and small: a fast test)
    config.update(train_data=str(tmp_path / "train.tsv"), max_source_length=8,
                  max_target_length=8, num_train_steps=2, schedule="constant", packing="false",
                  log_every_steps=1, eval_every_steps=0, checkpoint_every_steps=0,
                  progress_bar=False, beam_size=1, eval_batch_size=8, num_examples_to_print=0)
    workdir = str(tmp_path / "run")
    data = open_data(config)
    ex.train_and_test(config, workdir, data)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model_size"] == "auto"
    assert (saved["vocab_size"], saved["batch_size"], saved["learning_rate"],
            saved["model"]["dropout_rate"]) == (1000, 128, 1e-3, 0.1)  # "tiny"'s
    assert saved["warmup_steps"] == 0  # "tiny"'s 100, cut to a fifth of the 2 steps
    assert (saved["model"]["d_model"], saved["model"]["num_encoder_layers"]) == (16, 1)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("model: "))
    assert "'tiny'" in line and f"for {len(data.train)} training pairs" in line
    assert "kept your config.model.d_model = 16" in line
    config.num_train_steps = 3  # resumed on the same data: one more step, config.json rewritten
    ex.train_and_test(config, workdir, open_data(config))
    assert line in capsys.readouterr().err.splitlines()
    resumed = json.load(open(os.path.join(workdir, "config.json")))
    assert resumed.pop("num_train_steps") == 3 and saved.pop("num_train_steps") == 2
    assert resumed == saved


def test_the_base_variant_is_the_base_size_with_the_papers_schedule():
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                        "translate.py")
    spec = importlib.util.spec_from_file_location("translate_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("base")
    sizes, line = ex.decide_sizes(config, 100)  # a named size: the number of pairs is moot
    assert (sizes["model.d_model"], sizes["model.d_ff"], sizes["model.num_heads"],
            sizes["vocab_size"], sizes["batch_size"]) == (512, 2048, 8, 37_000, 256)
    assert "learning_rate" not in sizes and line.endswith(
        "kept your config.learning_rate = 1.0, config.warmup_steps = 4000, "  # eq. 3's
        "config.eval_batch_size = 256")
    ex.check(config, tr.make_mesh(config.mesh))
