"""Sequence transduction with the encoder-decoder Transformer: train, evaluate, translate.

    # train (built-in number_words, English -> German number words, by default)
    python experiments/translate.py --workdir=/tmp/translate [--config=experiments/configs/translate.py]
        [--config.train_data=train.tsv --config.eval_data=eval.tsv]
        [--config.dataset=wmt14_translate/de-en --config.data_dir=DIR] [--config.KEY=VALUE ...]
    # translate with the trained model (beam search); "-" reads one sentence per stdin line
    python experiments/translate.py --workdir=/tmp/translate --translate="twenty one" \
        --translate="three hundred five"

Training greedy-decodes the eval split at every evaluation (exact_match, bleu in
metrics.jsonl), then beam-decodes the test split, prints example translations
and a summary table. Translation reads the model from the workdir (config.json,
the cached tokenizer and the latest checkpoint); of --config only the decoding
keys (beam_size, alpha) apply there. See docs/translate.md.
"""
from __future__ import annotations

import json
import os
import sys
import time

STARTED = time.monotonic()

import grain
import jax
import ml_collections
import tensorflow_datasets as tfds
from absl import flags, logging

from tfx_jax import train as tr
from tfx_jax.data.number_words_dataset import number_words_config
from tfx_jax.data.pair_sources import NUMBER_WORDS, open_text_pairs
from tfx_jax.data.text_pipeline import eval_batches, longest_pair, train_batches
from tfx_jax.data.tokenizer import SentencePieceTokenizer, load_or_train_tokenizer, tokenizer_path
from tfx_jax.train.progress import print_summary
from tfx_jax.apps.translation import (make_evaluate, transformer_config, translate_eval_data,
                                 translate_texts, translation_scores, translation_task)

flags.DEFINE_multi_string("translate", None, "Sentences to translate with the model in "
                          "--workdir (repeat the flag; '-' reads lines from stdin).")
FLAGS = flags.FLAGS
tfds.disable_progress_bar()

CONFIG_FILE = "config.json"
ERROR_EXIT_CODE = 2


# ----------------------------------------------------------------------------- data

def _is_number_words(spec: str) -> bool:
    return spec.split("/")[0] == NUMBER_WORDS


def open_split(config, split_key: str, data_key: str):
    """The pairs of one split: ``config[data_key]`` if set, else ``config.dataset``'s split."""
    spec = config[data_key] or config.dataset
    options = dict(data_dir=config.data_dir, in_memory=config.data_in_memory)
    if not spec.endswith(".tsv"):
        options.update(source_language=config.source_language,
                       target_language=config.target_language)
    if _is_number_words(spec):
        config_name = spec.partition("/")[2] or "en_de"
        sizes = number_words_config(config_name.split("_")[-1], **config.number_words.to_dict())
        if sizes.name != config_name:  # not a registered config: generate these sizes
            options["number_words_config"] = sizes
    return open_text_pairs(spec, config[split_key], **options)


def open_data(config):
    """(train, eval, test) pairs; without a test split a TSV run tests on its eval file."""
    train = open_split(config, "train_split", "train_data")
    evaluation = open_split(config, "eval_split", "eval_data")
    if config.test_data or not config.eval_data.endswith(".tsv"):
        test = open_split(config, "test_split", "test_data")
    else:
        test = evaluation
    return train, evaluation, test


def bleu_tokenize(config) -> str:
    """sacrebleu tokenizer: config.bleu_tokenize, or "char" for the one-word number_words."""
    if config.bleu_tokenize:
        return config.bleu_tokenize
    uses_number_words = not (config.train_data or config.eval_data) and _is_number_words(
        config.dataset)
    return "char" if uses_number_words else "13a"


def model_config(config, tokenizer):
    return transformer_config(config.model, vocab_size=tokenizer.vocab_size,
                              max_len=max(config.max_source_length, config.max_target_length))


def make_task(config, model, evaluate=None) -> tr.Task:
    return translation_task(model, max_source_length=config.max_source_length,
                            max_target_length=config.max_target_length,
                            label_smoothing=config.label_smoothing, evaluate=evaluate)


# ------------------------------------------------------------------------- training

def _minutes() -> float:
    """Minutes since the script started (data preparation and compilation included)."""
    return (time.monotonic() - STARTED) / 60


def save_config(config, workdir: str) -> None:
    """Keeps the run's config as <workdir>/config.json for --translate (process 0)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _decoding_name(beam_size: int) -> str:
    return "greedy" if beam_size == 1 else f"beam search {beam_size}"


def print_examples(sources, references, hypotheses, count: int, decoding: str) -> None:
    """The first ``count`` test translations, then the first ``count`` mistakes (process 0)."""
    if jax.process_index() != 0:
        return
    rows = list(zip(sources, references, hypotheses))
    wrong = [row for row in rows if row[1] != row[2]]
    for title, chosen in ((f"Example translations (test split, {decoding})", rows[:count]),
                          (f"Mistakes ({len(wrong)} of {len(rows)})", wrong[:count])):
        if chosen:
            print(f"\n{title}:")
            for source, reference, hypothesis in chosen:
                mark = "ok" if hypothesis == reference else f"expected: {reference}"
                print(f"  {source}\n    -> {hypothesis}   [{mark}]")


def train_and_test(config, workdir: str, data) -> dict:
    """Trains on ``data = (train, eval, test)`` pairs, then beam-decodes and scores the test pairs.

    Returns the test scores, sources and hypotheses.
    """
    train_pairs, eval_pairs, test_pairs = data
    tokenizer = load_or_train_tokenizer(train_pairs, workdir, vocab_size=config.vocab_size,
                                        model_type=config.tokenizer_type,
                                        split_digits=config.split_digits, seed=config.seed)
    if not (config.max_source_length and config.max_target_length):
        source, target = longest_pair(train_pairs, tokenizer, seed=config.seed)
        config.max_source_length = config.max_source_length or source
        config.max_target_length = config.max_target_length or target
    model = model_config(config, tokenizer)
    lengths = dict(max_source_length=config.max_source_length,
                   max_target_length=config.max_target_length)
    train_iter = train_batches(train_pairs, tokenizer, global_batch_size=config.batch_size,
                               seed=config.seed, drop_overlong=config.drop_overlong,
                               read_options=grain.ReadOptions(num_threads=config.data_threads),
                               **lengths)
    eval_data = eval_batches(eval_pairs, tokenizer, global_batch_size=config.eval_batch_size,
                             **lengths)
    translation_metrics = make_evaluate(
        model, eval_data, tokenizer, max_length=config.max_target_length,
        beam_size=config.eval_beam_size, alpha=config.alpha, bleu_tokenize=bleu_tokenize(config))

    def evaluate(params, step, mesh):  # + minutes since start, for learning curves in time
        return {**translation_metrics(params, step, mesh), "wall_minutes": _minutes()}

    if jax.process_index() == 0:
        print(f"data: {len(train_pairs)} train / {len(eval_pairs)} eval / {len(test_pairs)} "
              f"test pairs, vocabulary {tokenizer.vocab_size}, rows of "
              f"{config.max_source_length} / {config.max_target_length} tokens; "
              f"{config.num_train_steps} steps of {config.batch_size}", file=sys.stderr)
    save_config(config, workdir)
    mesh = tr.make_mesh(config.mesh)  # --config.mesh.fsdp=4 etc.
    result = tr.train(config, workdir, make_task(config, model, evaluate), train_iter,
                      eval_batches=eval_data, mesh=mesh)
    test_data = eval_batches(test_pairs, tokenizer, global_batch_size=config.eval_batch_size,
                             **lengths)
    return final_test(config, workdir, result, model, tokenizer, test_data, mesh)


def final_test(config, workdir: str, result: tr.TrainResult, model, tokenizer, test_data,
               mesh) -> dict:
    """Beam search on the test split: a "test" line in metrics.jsonl, examples, summary."""
    hypotheses = translate_eval_data(result.state.params, model, test_data, tokenizer, mesh,
                                     max_length=config.max_target_length,
                                     beam_size=config.beam_size, alpha=config.alpha)
    scores = translation_scores(hypotheses, test_data.references,
                                bleu_tokenize=bleu_tokenize(config))
    step = int(result.state.step)
    writer = tr.MetricsWriter(workdir, start_step=step)
    try:
        test_record = writer.write(step, "test", {**scores, "beam_size": config.beam_size,
                                                   "num_examples": test_data.num_examples,
                                                   "wall_minutes": _minutes()})
    finally:
        writer.close()
    print_examples(test_data.sources, test_data.references, hypotheses,
                   config.num_examples_to_print, _decoding_name(config.beam_size))
    rows = {split: {k: v for k, v in record.items() if k != "split"}
            for split, record in (("train", result.train_metrics), ("eval", result.eval_metrics),
                                  ("test", test_record)) if record}
    print_summary(f"\nTranslation, {step} steps (workdir {workdir}); test: "
                  f"{_decoding_name(config.beam_size)}, eval: "
                  f"{_decoding_name(config.eval_beam_size)}", rows)
    return dict(scores=scores, sources=test_data.sources, hypotheses=hypotheses)


# ---------------------------------------------------------------------- translation

def load_translator(workdir: str):
    """(config, model config, params, tokenizer) of the run in ``workdir``."""
    path = os.path.join(workdir, CONFIG_FILE)
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isfile(path) or not os.path.isdir(checkpoints):
        raise FileNotFoundError(f"no trained model in workdir {workdir!r} (no {CONFIG_FILE} "
                                f"or checkpoints/); train one first with "
                                f"`python experiments/translate.py --workdir={workdir}`")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    checkpointer = tr.Checkpointer(workdir, async_save=False)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}; train first")
        tokenizer = SentencePieceTokenizer(tokenizer_path(
            workdir, config.vocab_size, config.tokenizer_type, config.split_digits))
        model = model_config(config, tokenizer)
        optimizer, _ = tr.create_optimizer(config)
        target = tr.abstract_train_state(make_task(config, model).init_params, optimizer,
                                         config.seed, tr.replicated_sharding(tr.make_data_mesh()))
        params = checkpointer.restore(target).params
    finally:
        checkpointer.close()
    return config, model, params, tokenizer


def translate_command(config, workdir: str, sentences: list[str]) -> None:
    if "-" in sentences:  # stdin's lines take the place of "-"
        stdin = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        sentences = [line for s in sentences for line in (stdin if s == "-" else [s])]
    trained, model, params, tokenizer = load_translator(workdir)
    outputs = translate_texts(params, model, tokenizer, sentences,
                              max_source_length=trained.max_source_length,
                              max_length=trained.max_target_length,
                              beam_size=config.beam_size, alpha=config.alpha)
    print("\n".join(outputs))


def main(config, workdir: str) -> None:
    if not FLAGS["verbosity"].present:  # libraries' INFO logs only with --verbosity=0
        logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.translate:
            translate_command(config, workdir, FLAGS.translate)
            return
        data = open_data(config)
    except (FileNotFoundError, ValueError) as error:  # bad data or workdir: a short message
        print(f"error: {error}", file=sys.stderr)
        sys.exit(ERROR_EXIT_CODE)
    train_and_test(config, workdir, data)


if __name__ == "__main__":
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "translate.py"))
