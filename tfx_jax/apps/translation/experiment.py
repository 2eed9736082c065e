"""The translation experiment: check, prepare, train, test; and translate with a trained workdir.

:func:`train_and_test` is what ``experiments/translate.py`` runs. Its order is
the point: everything that can be refused is refused before anything is
written, so a refused run leaves the workdir as it was.

1. :func:`check`: ``model_size``, training keys, model section (``d_model``
   divisible by ``num_heads``, known fields, heads and widths against
   ``mesh.tensor``; keys the size decides filled in with a named size's values,
   or for "auto" number_words'), every batch size against the mesh, decoding
   and data keys. No data is read.
2. The workdir: one of another script is refused naming it
   (:func:`tfx_jax.train.check_workdir`); then its lock (one run per workdir; a
   file or read-only workdir fails here, before data preparation).
3. Data (:mod:`.data`); :func:`decide_sizes` (``config.model_size``: the
   model, vocabulary, dropout, batch and learning rate the user left None, from
   the number of training pairs); the tokenizer (trained into a temporary
   directory, or read from the workdir); :func:`resolve` turns what they decide
   (row lengths, :mod:`tfx_jax.data.length_caps`; packing; the training length
   in steps or epochs) into the frozen plan the rest of the run reads.
4. One Task; :func:`tfx_jax.train.check_checkpoint_fits`: a resumed
   workdir's checkpoint must fit the model.
5. Only then the tokenizer is written into the workdir, and
   :func:`tfx_jax.train.train` writes config.json (once) and checkpoints;
   :func:`final_test` reports (once per step: a rerun of a finished workdir
   does not test again).

Every workdir file goes through ``etils.epath``, so a ``gs://`` workdir
stays a URL. :func:`load_translator` restores only the parameters
(:func:`tfx_jax.train.restore_params`) with the config.json and tokenizer the
run left; :func:`translate_lines` keeps one output line per input line.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional

import grain
import jax

from tfx_jax import train as tr
from tfx_jax.errors import is_int, is_number, require, require_key, say
from tfx_jax.apps.translation.data import (TSV_HEADER, TranslationData, bleu_tokenize,
                                           is_number_words, open_data)
from tfx_jax.apps.translation.evaluation import (make_evaluate, translate_eval_data,
                                                 translation_scores)
from tfx_jax.apps.translation.inference import translate_texts
from tfx_jax.apps.translation.task import (make_init_params, transformer_config,
                                           translation_task)
from tfx_jax.data.length_caps import length_caps
from tfx_jax.data.packing import (PackingChoice, choose_packing, measurement_pipeline,
                                  packing_setting, run_pipeline)
from tfx_jax.data.text_pipeline import eval_batches, train_batches
from tfx_jax.data.tokenizer import (SentencePieceTokenizer, load_or_train_tokenizer,
                                    read_workdir_tokenizer, tokenizer_path, workdir_tokenizer,
                                    write_workdir_file)
from tfx_jax.train.checkpoint import check_checkpoint_fits, workdir_lock
from tfx_jax.train.mesh import padded_batch_size
from tfx_jax.train.metrics import print_summary

JOB = "translate"
STARTED = time.monotonic()


def _minutes() -> float:
    """Minutes since the program started (data preparation and compilation included)."""
    return (time.monotonic() - STARTED) / 60





def model_config(config, vocab_size: int):
    return transformer_config(config.model, vocab_size=vocab_size,
                              max_len=max(config.max_source_length, config.max_target_length, 2))


def make_task(config, model, evaluate=None) -> tr.Task:
    """The app's task factory: ``make_task(plan, model config, evaluate)``."""
    return translation_task(model, max_source_length=max(config.max_source_length, 2),
                            max_target_length=max(config.max_target_length, 2),
                            label_smoothing=config.label_smoothing, evaluate=evaluate)


def check(config, mesh) -> None:
    """One ConfigError naming the first bad key; reads no data, writes nothing.

    What the data decides later (row lengths, steps) is checked with stand-ins
    here and for real in :func:`resolve`.
    """
    for key in ("num_train_steps", "max_source_length", "max_target_length"):
        value = config[key]
        require_key(config, key, is_int(value) and value >= 0,
                    "a non-negative integer (0 = from the data)")
    require_key(config, "num_epochs", is_number(config.num_epochs) and config.num_epochs >= 0,
                "a non-negative number (0 = use num_train_steps)")
    require(not (config.num_epochs > 0 and config.num_train_steps > 0),
            f"set one of config.num_epochs ({config.num_epochs}) and config.num_train_steps "
            f"({config.num_train_steps}), not both")
    # the sized keys a user left None: the named size's, or for "auto" the one number_words
    # gets (the size the data picks is checked against the mesh in train_and_test)
    sizes = decide_sizes(config, 0, user_corpus=False)[0]
    if config.num_train_steps:
        sizes = cut_warmup(sizes, config.num_train_steps)[0]
    probe = tr.freeze(config, JOB, **sizes).as_configdict()
    if not config.num_train_steps:  # decided by the data; check the other keys now
        probe.num_train_steps = config.grad_accum_steps * (probe.warmup_steps + 1)
    tr.validate_config(probe)
    for key in ("eval_batch_size", "beam_size", "eval_beam_size", "vocab_size"):
        require_key(probe, key, is_int(probe[key]) and probe[key] > 0, "a positive integer")
    require_key(probe, "vocab_size", probe.vocab_size >= 5, ">= 5 (4 reserved ids)")
    for key, value in (("max_source_length", config.max_source_length),
                       ("max_target_length", config.max_target_length)):
        require_key(config, key, value == 0 or value >= 2, "0 (from the data) or >= 2")
    require_key(config, "alpha", is_number(config.alpha) and config.alpha >= 0,
                "a non-negative number")
    require_key(config, "label_smoothing",
                is_number(config.label_smoothing) and 0 <= config.label_smoothing < 1, "in [0, 1)")
    require_key(config, "eval_holdout",
                is_number(config.eval_holdout) and 0 < config.eval_holdout <= 0.5, "in (0, 0.5]")
    require_key(config, "length_percentile",
                is_number(config.length_percentile) and 0 < config.length_percentile <= 100,
                "in (0, 100]")
    require_key(config, "outlier_factor",
                is_number(config.outlier_factor) and config.outlier_factor >= 1, ">= 1")
    packing_setting(config.packing)  # "auto", "true" or "false"
    require_key(config, "tsv_header", config.tsv_header in TSV_HEADER,
                f"one of {tuple(TSV_HEADER)}")
    tr.check_batch_size(probe.batch_size, mesh)
    check_model_fits_mesh(model_config(probe, probe.vocab_size), mesh)


def check_model_fits_mesh(model, mesh) -> None:
    """d_model % num_heads, unknown fields; then heads, d_ff, vocab against mesh.tensor.

    Traces a fresh ``init_params`` of tiny rows (shapes only): JAX caches what
    ``eval_shape`` of one function returned, so the task's own one stays unboxed.
    """
    tr.check_params_fit_mesh(make_init_params(model, max_source_length=2,
                                              max_target_length=2), mesh)


# ------------------------------------------------------------ the model size from the data

@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A named size: the model section's widths and depths and the keys that go with them."""
    d_model: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    d_ff: int
    dropout_rate: float
    vocab_size: int  # an upper bound: a small corpus gets the vocabulary it supports
    batch_size: int  # rows per step (a packed row holds several pairs)
    learning_rate: float  # the peak of config.schedule
    warmup_steps: int  # at most a fifth of the run (:func:`resolve`)
    eval_batch_size: int  # sentences per decoding batch: beam search keeps beam_size caches
    # of every layer per sentence, so a deep, wide model decodes fewer at a time

    def values(self) -> dict:
        """Config keys (``model.*`` dotted) -> this size's values."""
        return {(f"model.{key}" if key in MODEL_KEYS else key): value
                for key, value in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        return (f"{self.num_encoder_layers}+{self.num_decoder_layers} layers, d_model "
                f"{self.d_model}, d_ff {self.d_ff}, {self.num_heads} heads, dropout "
                f"{self.dropout_rate:g}, vocabulary <= {self.vocab_size:,}, batch "
                f"{self.batch_size}, learning rate {self.learning_rate:g}, warm-up "
                f"{self.warmup_steps}, decoding batch {self.eval_batch_size}")


MODEL_KEYS = ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "d_ff",
              "dropout_rate")
# The sizes and the smallest user corpus (training pairs) each is chosen for:
# * "tiny": this project's number_words model (docs/translate.md: tuned to >= 95% exact
#   match in 10 CPU minutes); also for user corpora below 20,000 pairs.
# * "small": the IWSLT'14 De-En Transformer of fairseq (arch transformer_iwslt_de_en: 6+6
#   layers, d_model 512, FFN 1024, 4 heads; dropout 0.3; Adam (0.9, 0.98), lr 5e-4 after
#   4,000 warm-up updates, batches of 4,096 tokens (rows here); joint BPE of 10,000 merges), trained
#   on 160,239 pairs: about 34-35 BLEU De->En, 28-29 En->De on the IWSLT'14 test set
#   (docs/translate.md names the sources).
# * "base": the base model of Vaswani et al. 2017 (6+6 layers, d_model 512, d_ff 2048, 8
#   heads, dropout 0.1, a shared vocabulary of about 37,000 BPE tokens, 4,000 warm-up
#   steps; 27.3 BLEU on WMT'14 En-De newstest2014 after training on 4.5M pairs). Its
#   schedule (eq. 3) peaks at 512^-0.5 * 4000^-0.5 = 7.0e-4, the peak used here.
# Decoding batches are not published figures: 100 sentences keep beam search (4 beams) of a
# 6+6 d_model 512 model within a few GB (500, tiny's, needed over 21 GB on a CPU host:
# docs/translate.md).
# The thresholds sit between the corpora the sizes were published for (on a log scale,
# the 1M of "base" is near the geometric mean of 160k and 4.5M); they are a rule of
# thumb, not measured optima: set config.model_size or the keys to choose.
MODEL_SIZES = {
    "tiny": ModelSize(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                      d_ff=512, dropout_rate=0.1, vocab_size=1000, batch_size=128,
                      learning_rate=1e-3, warmup_steps=100, eval_batch_size=500),
    "small": ModelSize(d_model=512, num_heads=4, num_encoder_layers=6, num_decoder_layers=6,
                       d_ff=1024, dropout_rate=0.3, vocab_size=10_000, batch_size=128,
                       learning_rate=5e-4, warmup_steps=4000, eval_batch_size=100),
    "base": ModelSize(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                      d_ff=2048, dropout_rate=0.1, vocab_size=37_000, batch_size=256,
                      learning_rate=7e-4, warmup_steps=4000, eval_batch_size=100),
}
SMALLEST_CORPUS = {"tiny": 0, "small": 20_000, "base": 1_000_000}  # training pairs
WARMUP_SHARE = 5  # a size's warm-up is at most 1/5 of the run's steps


def size_for(num_train_pairs: int, user_corpus: bool = True) -> str:
    """The named size ``config.model_size = "auto"`` picks (number_words: "tiny")."""
    if not user_corpus:
        return "tiny"
    return max((pairs, name) for name, pairs in SMALLEST_CORPUS.items()
               if num_train_pairs >= pairs)[1]


def _key(config, key: str):
    *parents, leaf = key.split(".")
    for parent in parents:
        config = config[parent]
    return config.get(leaf)


def cut_warmup(sizes: dict, num_train_steps: int) -> tuple[dict, Optional[str]]:
    """(``sizes`` with a decided warm-up cut to a fifth of the run, a note if it was cut)."""
    most = num_train_steps // WARMUP_SHARE
    if sizes.get("warmup_steps", 0) <= most:
        return sizes, None
    return {**sizes, "warmup_steps": most}, (
        f"warm-up: {most} of the {num_train_steps} training steps (a fifth: the model size's "
        f"{sizes['warmup_steps']} do not fit; set config.warmup_steps to choose)")


def check_model_size(config) -> str:
    """The size config.model_size names ("auto" -> None); ConfigError for another value."""
    name = config.get("model_size", "auto")
    require_key(config, "model_size", name == "auto" or name in MODEL_SIZES,
                f"'auto' or one of {tuple(MODEL_SIZES)}")
    return None if name == "auto" else name


def decide_sizes(config, num_train_pairs: int, user_corpus: bool = True) -> tuple[dict, str]:
    """(the sized keys ``config`` leaves None -> the chosen size's values, a line saying so).

    ``config.model_size`` names the size, or "auto" picks it with :func:`size_for`
    from the number of training pairs (a compile-only run can pass a stated
    number). A key the user set (not None) keeps its value.
    """
    name = check_model_size(config)
    why = f"(config.model_size = {name!r}"
    if name is None:
        name = size_for(num_train_pairs, user_corpus)
        corpus = f"{num_train_pairs:,} training pairs" if user_corpus else "number_words"
        why = f"for {corpus} (config.model_size = 'auto'"
    size = MODEL_SIZES[name]
    decided = {key: value for key, value in size.values().items() if _key(config, key) is None}
    kept = [f"config.{key} = {_key(config, key)!r}" for key in size.values()
            if key not in decided]
    line = (f"model: {name!r} ({size.describe()}) {why}; set it or config.model.*, "
            f"config.vocab_size, ... to choose)")
    return decided, line + (f"; kept your {', '.join(kept)}" if kept else "")


def resolve_train_length(config, num_pairs: int, user_corpus: bool,
                         pairs_per_row: float = 1.0) -> tuple[int, str]:
    """(training steps from steps, epochs or the default; a line saying so).

    ``pairs_per_row``: training pairs per row (more than 1 when packed), so
    that an epoch is still one pass over the pairs.
    """
    steps_per_epoch = num_pairs / (config.batch_size * pairs_per_row)
    auto = config.auto_train_length
    if config.num_epochs > 0:
        steps = math.ceil(config.num_epochs * steps_per_epoch)
        how = f"config.num_epochs = {config.num_epochs:g}"
    elif config.num_train_steps > 0:
        steps, how = config.num_train_steps, "config.num_train_steps"
    elif user_corpus:
        steps = min(auto.max_steps, max(auto.min_steps,
                                        math.ceil(auto.epochs * steps_per_epoch)))
        how = (f"default for a user corpus: {auto.epochs:g} epochs, at least "
               f"{auto.min_steps} and at most {auto.max_steps} steps; set config.num_epochs "
               f"or config.num_train_steps to choose")
    else:
        steps, how = auto.number_words_steps, "default for number_words"
    accum = config.grad_accum_steps
    steps = max(accum, math.ceil(steps / accum) * accum)
    epochs = steps / steps_per_epoch
    rows = (f"{config.batch_size} rows of ~{pairs_per_row:.1f} pairs" if pairs_per_row != 1
            else f"{config.batch_size}")
    return steps, (f"training length: {steps} steps of {rows} = {epochs:.2f} epochs of "
                   f"{num_pairs} pairs ({how})")


# ------------------------------------------------------------------------ the tokenizer

def _tokenizer_name(config) -> str:
    return os.path.basename(tokenizer_path("", config.vocab_size, config.tokenizer_type,
                                           config.split_digits))


def read_tokenizer(config, workdir: str) -> SentencePieceTokenizer:
    """The tokenizer a translation run left in ``workdir``."""
    return read_workdir_tokenizer(workdir, _tokenizer_name(config))


def run_tokenizer(config, workdir: str, train_pairs):
    """(tokenizer, bytes to write into the workdir later or None if it is there already)."""
    return workdir_tokenizer(workdir, _tokenizer_name(config), lambda directory: (
        load_or_train_tokenizer(train_pairs, directory, vocab_size=config.vocab_size,
                                model_type=config.tokenizer_type,
                                split_digits=config.split_digits, seed=config.seed)))


# -------------------------------------------------------------------------- training

def _train_batches(config, data: TranslationData, tokenizer, *, packing: bool, **kwargs):
    """The Grain training pipeline (``kwargs``: process_index / count, read_options)."""
    kwargs.setdefault("read_options", grain.ReadOptions(num_threads=config.data_threads))
    return train_batches(data.train, tokenizer, global_batch_size=config.batch_size,
                         seed=config.seed, max_source_length=config.max_source_length,
                         max_target_length=config.max_target_length,
                         drop_overlong=config.drop_overlong, packing=packing, **kwargs)


def resolve(config, data: TranslationData, tokenizer,
            sizes: Optional[dict] = None) -> tuple[object, PackingChoice]:
    """(the run's plan, the packing decision): what the data decides, computed once.

    ``sizes``: the keys :func:`decide_sizes` decided (None: decided here). Row
    lengths (``max_source_length`` / ``max_target_length`` when 0), packing
    (measured on the first batches; :func:`tfx_jax.data.packing.measurement_pipeline`:
    one process trains on the measured pipeline, several each decide alike), the
    training length and a decided warm-up cut to at most a
    fifth of it go into a frozen copy of ``config`` (:func:`tfx_jax.train.freeze`);
    ``config`` itself is not changed.
    """
    if sizes is None:
        sizes = decide_sizes(config, len(data.train), data.user_corpus)[0]
    lengths = dict(max_source_length=config.max_source_length,
                   max_target_length=config.max_target_length)
    if not (lengths["max_source_length"] and lengths["max_target_length"]):
        caps = length_caps(data.train, tokenizer, percentile=config.length_percentile,
                           outlier_factor=config.outlier_factor, seed=config.seed)
        lengths = dict(max_source_length=lengths["max_source_length"] or caps.max_source_length,
                       max_target_length=lengths["max_target_length"] or caps.max_target_length)
        say(caps.describe(config.drop_overlong))
    sized = tr.freeze(config, JOB, **sizes, **lengths)
    packing = choose_packing(config.packing, lambda packed: _train_batches(
        sized, data, tokenizer, packing=packed, **measurement_pipeline()), ("inputs", "targets"))
    say(packing.report("train rows"))
    steps, line = resolve_train_length(sized, len(data.train), data.user_corpus,
                                       packing.examples_per_row)
    say(line)
    sizes, note = cut_warmup(sizes, steps)
    if note:
        say(note)
    return tr.freeze(config, JOB, **sizes, **lengths, num_train_steps=steps), packing


def train_and_test(config, workdir: str, data: Optional[TranslationData] = None,
                   mesh=None) -> dict:
    """Checks, trains on the train pairs, then beam-decodes and scores the test pairs.

    The order is the module docstring's: :func:`check` (config only), the
    workdir (another script's is refused) and its lock, data and tokenizer,
    :func:`resolve` (the plan), one Task, the checkpoint fit, then training.
    Returns the test scores, sources and hypotheses.
    """
    mesh = tr.make_mesh(config.mesh) if mesh is None else mesh  # --config.mesh.fsdp=4 etc.
    check(config, mesh)
    if tr.compile_target() is not None:  # --compile_topology: the config alone, no data
        compile_only(config, workdir, mesh)
    tr.check_workdir(workdir, JOB)
    with workdir_lock(workdir):
        data = open_data(config) if data is None else data
        for note in data.notes:
            say(note)
        sizes, line = decide_sizes(config, len(data.train), data.user_corpus)
        say(line)
        tokenizer, tokenizer_bytes = run_tokenizer(tr.freeze(config, JOB, **sizes), workdir,
                                                   data.train)
        plan, packing = resolve(config, data, tokenizer, sizes)
        model = model_config(plan, tokenizer.vocab_size)
        eval_batch_size = padded_batch_size(plan.eval_batch_size, mesh)
        if eval_batch_size != plan.eval_batch_size:
            say(f"eval/test batches of {eval_batch_size} (config.eval_batch_size = "
                f"{plan.eval_batch_size} padded to a multiple of the {mesh.devices.size} "
                f"devices; padding rows are not scored)")
        lengths = dict(max_source_length=plan.max_source_length,
                       max_target_length=plan.max_target_length)
        eval_data = eval_batches(data.eval, tokenizer, global_batch_size=eval_batch_size,
                                 **lengths)
        translation_metrics = make_evaluate(
            model, eval_data, tokenizer, max_length=plan.max_target_length,
            beam_size=plan.eval_beam_size, alpha=plan.alpha, bleu_tokenize=bleu_tokenize(plan))

        def evaluate(params, step, mesh):  # + minutes since start, for learning curves in time
            return {**translation_metrics(params, step, mesh), "wall_minutes": _minutes()}

        if sizes:  # check() could only try the size number_words gets against the mesh
            check_model_fits_mesh(model, mesh)
        task = make_task(plan, model, evaluate)
        check_checkpoint_fits(workdir, task.init_params)  # reads metadata, writes nothing
        if tokenizer_bytes is not None:  # the first write into the workdir
            write_workdir_file(workdir, _tokenizer_name(plan), tokenizer_bytes)
        say(f"data: {len(data.train)} train / {len(data.eval)} eval / {len(data.test)} test "
            f"pairs, vocabulary {tokenizer.vocab_size}, rows of "
            f"{plan.max_source_length} / {plan.max_target_length} tokens; "
            f"{plan.num_train_steps} steps of {plan.batch_size}")
        train_data = run_pipeline(packing) or _train_batches(plan, data, tokenizer,
                                                              packing=packing.enabled)
        result = tr.train(plan, workdir, task, train_data, eval_batches=eval_data, mesh=mesh)
        test_data = eval_batches(data.test, tokenizer, global_batch_size=eval_batch_size,
                                 **lengths)
        return final_test(plan, workdir, result, model, tokenizer, test_data, mesh)


def compile_only(config, workdir: str, mesh) -> None:
    """``--compile_topology``: compiles the train and eval steps this run would compile on
    the target, from the config alone (:func:`tfx_jax.train.topology.compile_plan`): no
    data is read, nothing but the report is written. Rows of ``max_source_length`` /
    ``max_target_length`` tokens (which must then be set: the data cannot decide them),
    packed unless ``packing`` is "false", a vocabulary of ``vocab_size`` (the
    tokenizer's upper bound), the model of ``model_size`` (which must then be named for
    a user corpus: "auto" counts its pairs). Beam search at the test is not compiled."""
    require(config.max_source_length and config.max_target_length,
            "--compile_topology reads no data, so the row lengths cannot come from it: set "
            "config.max_source_length and config.max_target_length (tokens per row)")
    user_corpus = not is_number_words(config.train_data or config.dataset)
    require(not user_corpus or check_model_size(config) is not None,
            f"--compile_topology reads no data, so config.model_size = 'auto' cannot count "
            f"the training pairs: name the size ({', '.join(MODEL_SIZES)}) or set config.model.*")
    sizes = decide_sizes(config, 0, user_corpus=False)[0]
    steps = config.num_train_steps or config.grad_accum_steps * (
        (sizes.get("warmup_steps") or config.warmup_steps) + 1)  # the steps shape no program
    plan = tr.freeze(config, JOB, **sizes, num_train_steps=steps)
    model = model_config(plan, plan.vocab_size)
    task = make_task(plan, model)
    packed = packing_setting(plan.packing) is not False
    features = {"inputs": ((plan.max_source_length,), "int32"),
                "targets": ((plan.max_target_length,), "int32")}
    say(f"compiling for {tr.compile_target().name}: rows of {plan.max_source_length} / "
        f"{plan.max_target_length} tokens{' (packed)' if packed else ''}, vocabulary "
        f"{plan.vocab_size}, batches of {plan.batch_size}; no data is read")
    tr.compile_plan(plan, workdir, task, mesh,
                    tr.abstract_batch(plan.batch_size, features, packed=packed),
                    tr.abstract_batch(padded_batch_size(plan.eval_batch_size, mesh), features),
                    with_remat=lambda policy: make_task(
                        plan, dataclasses.replace(model, remat_policy=policy)))


def decoding_name(beam_size: int) -> str:
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


def final_test(config, workdir: str, result: tr.TrainResult, model, tokenizer, test_data,
               mesh) -> dict:
    """Beam search on the test split: a "test" line in metrics.jsonl, examples, summary.

    A rerun of a finished workdir (nothing trained) whose test at this step is in
    metrics.jsonl already says so and returns that line's scores instead of
    decoding again and appending a second one.
    """
    step = int(result.state.step)
    done = [r for r in tr.read_metrics(workdir, "test") if r.get("step") == step]
    if result.start_step == step and done:
        say(f"The test at step {step} is in {workdir}/metrics.jsonl already "
            f"(bleu {done[-1].get('bleu', float('nan')):.4g}); not repeated")
        return dict(scores={k: v for k, v in done[-1].items() if k != "split"},
                    sources=test_data.sources, hypotheses=None)
    hypotheses = translate_eval_data(result.state.params, model, test_data, tokenizer, mesh,
                                     max_length=config.max_target_length,
                                     beam_size=config.beam_size, alpha=config.alpha)
    scores = translation_scores(hypotheses, test_data.references,
                                bleu_tokenize=bleu_tokenize(config))
    writer = tr.MetricsWriter(workdir, start_step=step)
    try:
        test_record = writer.write(step, "test", {**scores, "beam_size": config.beam_size,
                                                   "num_examples": test_data.num_examples,
                                                   "wall_minutes": _minutes()})
    finally:
        writer.close()
    print_examples(test_data.sources, test_data.references, hypotheses,
                   config.num_examples_to_print, decoding_name(config.beam_size))
    rows = {split: {k: v for k, v in record.items() if k != "split"}
            for split, record in (("train", result.train_metrics), ("eval", result.eval_metrics),
                                  ("test", test_record)) if record}
    print_summary(f"\nTranslation, {step} steps (workdir {workdir}); test: "
                  f"{decoding_name(config.beam_size)}, eval: "
                  f"{decoding_name(config.eval_beam_size)}", rows)
    return dict(scores=scores, sources=test_data.sources, hypotheses=hypotheses)


# ----------------------------------------------------------------------- translation

@dataclasses.dataclass
class Translator:
    config: object  # the training run's config (config.json)
    model: object
    params: object
    tokenizer: SentencePieceTokenizer


def load_translator(workdir: str, *, step: Optional[int] = None) -> Translator:
    """The model trained in ``workdir``: its config.json, tokenizer and parameters only."""
    config = tr.load_config(workdir, job=JOB)
    tokenizer = read_tokenizer(config, workdir)
    model = model_config(config, tokenizer.vocab_size)
    params = tr.restore_params(workdir, make_task(config, model).init_params, step=step)
    return Translator(config=config, model=model, params=params, tokenizer=tokenizer)


def translate_lines(translator: Translator, lines: list[str], *, beam_size: int,
                    alpha: float) -> list[str]:
    """One output line per input line: blank in, blank out; warns about inputs it must cut."""
    config = translator.config
    limit = config.max_source_length
    for number, line in enumerate(lines, start=1):
        length = len(translator.tokenizer.encode(line)) + 1 if line.strip() else 0
        if length > limit:
            say(f"warning: input {number} has {length} tokens (EOS included); the model was "
                f"trained on rows of {limit}: only its first {limit - 1} tokens are translated")
    texts = [line for line in lines if line.strip()]
    translated = iter(translate_texts(
        translator.params, translator.model, translator.tokenizer, texts,
        max_source_length=limit, max_length=config.max_target_length, beam_size=beam_size,
        alpha=alpha) if texts else [])
    return [next(translated) if line.strip() else "" for line in lines]


def expand_stdin(sentences: list[str], stdin) -> list[str]:
    """``"-"`` is replaced by every line of ``stdin``, blank lines included."""
    if "-" not in sentences:
        return list(sentences)
    lines = [line.rstrip("\n").rstrip("\r") for line in stdin]
    return [line for s in sentences for line in (lines if s == "-" else [s])]
