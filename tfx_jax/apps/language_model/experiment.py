"""The language-modelling experiment: check, prepare, train, sample; and sample a trained workdir.

:func:`train` is what ``experiments/lm.py`` runs. As in the translation app,
everything that can be refused is refused before anything is written, so a
refused run leaves the workdir as it was:

1. The workdir: one of another script, or one trained on other data or from
   another checkpoint (``SAME_DATA``, ``finetune``), is refused.
2. :func:`check`: training keys, rows (``max_len``, also against the sample
   prompts), the tokenizer's ``vocab_size``, the model section and its heads
   and widths against the mesh, both batch sizes against the mesh,
   ``packing`` and the sampling keys; with ``init_from`` the checkpoint's
   config.json instead of the model section (:func:`checkpoint_model`: a
   changed architecture key that disagrees is refused), ``finetune`` and the
   LoRA keys. No data is read yet. Then the workdir's lock (one run per workdir).
3. :func:`prepare`: the corpus, the tokenizer (trained into a temporary
   directory, read from the workdir, or the checkpoint's), the held-out windows
   and the packing decision (:func:`tfx_jax.data.packing.choose_packing`: the
   first batches, measured with and without packing; one process then trains on
   the measured pipeline, several build it as process 0 of 1 so that every
   process decides alike); the plan (:func:`tfx_jax.train.freeze`),
   the checkpoint's weights (not when resuming), one Task and
   :func:`tfx_jax.train.check_checkpoint_fits`.
4. Only then the tokenizer (or the checkpoint's config.json and tokenizer
   files, into ``WORKDIR/init_from/``) is written into the workdir and
   :func:`tfx_jax.train.train` writes config.json and checkpoints; samples of
   ``config.sample_prompts`` are printed at the end.

:func:`generate` continues prompts with the model a run left in a workdir
(its config.json, tokenizer and latest parameters) or with a checkpoint
directory as it is; :func:`read_prompts` reads prompts from the command line,
a file (``@path``) or stdin (``-``).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

import grain
import jax
from etils import epath

from tfx_jax import pretrained
from tfx_jax import train as tr
from tfx_jax.apps.language_model.corpus import TextCorpus, open_corpus, read_text_file
from tfx_jax.apps.language_model.pipeline import (LENGTHS_KEYS, MIN_VOCAB_SIZE, eval_batches,
                                                  eval_windows, lm_tokenizer_path,
                                                  load_or_train_lm_tokenizer, special_ids,
                                                  train_batches)
from tfx_jax.apps.language_model.sampling import generate_texts
from tfx_jax.apps.language_model.task import (DEFAULT_MODEL, lm_config, lm_task,
                                              make_init_params)
from tfx_jax.data.packing import (PackingChoice, choose_packing, measurement_pipeline,
                                  packing_setting, run_pipeline)
from tfx_jax.data.tokenizer import (SentencePieceTokenizer, local_temp_dir, read_workdir_tokenizer,
                                    workdir_tokenizer, write_workdir_file)
from tfx_jax.errors import (ConfigError, DataError, DataNotFound, WorkdirError,
                            WorkdirNotFound, is_int, is_number, require, require_key, say)
from tfx_jax.lm import CausalLM, CausalLMConfig
from tfx_jax.train.checkpoint import check_checkpoint_fits, workdir_lock
from tfx_jax.train.finetune import FineTuning, parameter_counts

JOB = "lm"
# What a resumed workdir must have been trained on: other data would continue with the
# old data's tokenizer (and config.json would then name data it never saw).
SAME_DATA = ("dataset", "train_split", "text_key", "max_files", "init_from")





def check_sampling_config(config) -> None:
    """The sampling keys (``--generate`` and the samples after training); ValueError naming one."""
    require_key(config, "temperature", is_number(config.temperature) and config.temperature >= 0,
                "a number >= 0 (0 = greedy)")
    require_key(config, "top_k", is_int(config.top_k) and config.top_k >= 0,
                "an integer >= 0 (0 = off)")
    require_key(config, "top_p", is_number(config.top_p) and 0 < config.top_p <= 1,
                "in (0, 1] (1 = off)")
    for key in ("num_generate_tokens", "num_samples"):
        require_key(config, key, is_int(config[key]) and config[key] >= 1, "an integer >= 1")
    require_key(config, "sample_seed", is_int(config.sample_seed), "an integer")


def check(config, mesh, workdir: Optional[str] = None) -> None:
    """One ConfigError naming the first bad key; reads no data (a checkpoint's config.json
    at most: the copy in ``workdir`` when it has one), writes nothing."""
    tr.validate_config(config)
    require_key(config, "max_len", is_int(config.max_len) and config.max_len >= 2,
                "an integer >= 2 (tokens per row)")
    if config.get("init_from"):
        model = checkpoint_model(config, check_init_from(config, workdir))
        require(config.max_len <= model.max_len,
                f"config.max_len = {config.max_len} is longer than config.init_from's context "
                f"({model.max_len} positions); lower config.max_len")
    else:
        require_key(config, "vocab_size",
                    is_int(config.vocab_size) and config.vocab_size >= MIN_VOCAB_SIZE,
                    f"an integer >= {MIN_VOCAB_SIZE} (256 byte pieces, 4 reserved "
                    f"ids and the common characters)")
        model = lm_config(config.model, vocab_size=config.vocab_size, max_len=config.max_len)
    for key in ("eval_batch_size", "max_eval_examples", "tokenizer_max_chars"):
        require_key(config, key, is_int(config[key]) and config[key] >= 1, "a positive integer")
    for key in ("num_packing_bins", "data_threads"):
        require_key(config, key, is_int(config[key]) and config[key] >= 0,
                    "a non-negative integer (0 = default)")
    require_key(config, "max_files",
                config.max_files is None or (is_int(config.max_files) and config.max_files >= 1),
                "None (all) or a positive integer")
    require_key(config, "eval_fraction",
                is_number(config.eval_fraction) and 0 < config.eval_fraction < 1, "in (0, 1)")
    require_key(config, "sample_prompts",
                isinstance(config.sample_prompts, (tuple, list))
                and all(isinstance(p, str) for p in config.sample_prompts),
                "a tuple of strings (() = none)")
    packing_setting(config.packing)  # "auto", "true" or "false"
    check_sampling_config(config)
    # a sample prompt is BOS and at least one token, and leaves room for one more
    require(not config.sample_prompts or config.max_len >= 3,
            f"config.max_len = {config.max_len} leaves no room for the samples of "
            f"config.sample_prompts after training (BOS, a prompt token and a new token need "
            f"3); raise max_len or set --config.sample_prompts='()'")
    tr.check_batch_size(config.batch_size, mesh)
    tr.check_batch_size(config.eval_batch_size, mesh, what="config.eval_batch_size")
    tr.check_params_fit_mesh(make_init_params(model, max_len=config.max_len), mesh)


# ------------------------------------------------------------ starting from a checkpoint

FINETUNE_MODES = ("full", "lora")
# A run from a checkpoint copies these of its files into WORKDIR/init_from/, so that a
# resume and --generate rebuild the same model and tokenizer without the checkpoint.
CHECKPOINT_DIR = "init_from"
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")
# config.model keys that apply on top of a checkpoint (how it computes, not its weights).
RUN_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "dtype", "attention_implementation",
                  "scan_layers", "remat_policy")


def check_init_from(config, workdir: Optional[str] = None) -> str:
    """``config.finetune`` and ``config.init_from`` (a directory with a tokenizer.json);
    returns where the checkpoint's config.json and tokenizer are: the copy in ``workdir``
    when it has one (a resume needs no more of the checkpoint), else init_from."""
    require_key(config, "finetune", config.get("finetune") in FINETUNE_MODES,
                f"one of {FINETUNE_MODES} with config.init_from")
    finetuning_of(config)  # the LoRA keys
    copy = workdir_checkpoint_files(workdir) if workdir is not None else None
    if copy is not None:
        return copy
    directory = config.init_from
    require_key(config, "init_from", isinstance(directory, str) and os.path.isdir(directory),
                "a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    require(os.path.isfile(os.path.join(directory, "tokenizer.json"))
            or tr.compile_target() is not None,  # compiling needs only config.json
            f"config.init_from={directory!r} has no tokenizer.json, which the run tokenizes "
            f"its data with (save one with transformers' AutoTokenizer)", DataNotFound)
    return directory


def finetuning_of(config) -> Optional[FineTuning]:
    """How a run from ``config.init_from`` trains (None without one): every weight, or LoRA
    adapters on the attention and MLP kernels (nothing new: the LM keeps its head)."""
    if not config.get("init_from"):
        return None
    return FineTuning(mode=config.finetune, new=(), lora_rank=config.lora_rank,
                      lora_alpha=float(config.lora_alpha))


def checkpoint_model(config, directory: str) -> CausalLMConfig:
    """The checkpoint's model (its config.json) with ``config.model``'s RUN_MODEL_KEYS.

    Any other key of ``config.model`` is the checkpoint's: one the user changed from
    the default config (DEFAULT_MODEL) that the checkpoint disagrees with is refused.
    """
    cfg = pretrained.load_hf_config(directory)
    section = config.model
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    for key, value in section.items():
        if key in RUN_MODEL_KEYS or value is None or value == DEFAULT_MODEL.get(key):
            continue
        require(value == getattr(cfg, key, None),
                f"config.model.{key} = {value!r} conflicts with config.init_from's "
                f"{key} = {getattr(cfg, key, None)!r}: the checkpoint fixes the architecture "
                f"(only {', '.join(RUN_MODEL_KEYS)} apply); leave config.model.{key} out")
    run = {key: section[key] for key in RUN_MODEL_KEYS if section.get(key) is not None}
    return dataclasses.replace(cfg, **run)


def workdir_checkpoint_files(workdir: str) -> Optional[str]:
    """A local copy of ``WORKDIR/init_from/`` (config.json, tokenizer) when the workdir
    holds a checkpoint of a run from ``init_from``, else None."""
    source = epath.Path(workdir) / CHECKPOINT_DIR
    if not ((source / "config.json").exists() and has_checkpoint(workdir)):
        return None
    local = local_temp_dir()
    for name in CHECKPOINT_FILES:
        if (source / name).exists():
            with open(os.path.join(local, name), "wb") as f:
                f.write((source / name).read_bytes())
    return local


def write_checkpoint_files(workdir: str, directory: str) -> None:
    """Copies the checkpoint's CHECKPOINT_FILES into ``WORKDIR/init_from/``."""
    for name in CHECKPOINT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                write_workdir_file(workdir, f"{CHECKPOINT_DIR}/{name}", f.read())


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint (a resumed run starts from it)."""
    directory = epath.Path(workdir) / "checkpoints"
    return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


@dataclasses.dataclass(frozen=True)
class Start:
    """The model and tokenizer a run from ``config.init_from`` starts with, and where their
    files are (the workdir's copy when resuming, else init_from itself)."""
    model: CausalLMConfig
    tokenizer: pretrained.CheckpointTokenizer
    files: str
    copied: bool  # the workdir has the files already


def checkpoint_start(config, workdir: str) -> Optional[Start]:
    """The model and tokenizer of ``config.init_from`` (no weights read); None without it."""
    if not config.get("init_from"):
        return None
    copy = workdir_checkpoint_files(workdir)
    files = copy or config.init_from
    model = checkpoint_model(config, files)
    tokenizer = pretrained.load_tokenizer(files)
    require(tokenizer.vocab_size <= model.vocab_size,
            f"{files}: tokenizer.json has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size {model.vocab_size}", DataError)
    return Start(model=model, tokenizer=tokenizer, files=files, copied=copy is not None)


def checkpoint_params(config, start: Start, workdir: str, mesh=None):
    """The checkpoint's weights (per-layer layout: the task stacks them for
    ``scan_layers``), or None when the workdir has a checkpoint of its own (a resume
    starts from that). With a ``mesh`` each device reads only its shard of each tensor
    (``pretrained.load_hf(mesh=...)``): no host holds the whole model."""
    model = start.model
    say(f"config.init_from={config.init_from}: {model.num_layers} layers, d_model "
        f"{model.d_model}, vocabulary {model.vocab_size}, context {model.max_len}; the "
        f"checkpoint's architecture and tokenizer (config.model's other keys, vocab_size and "
        f"the tokenizer keys do not apply)")
    if has_checkpoint(workdir):
        return None
    _, params = pretrained.load_hf(config.init_from, mesh=mesh)
    return params


def sampling_kwargs(config) -> dict:
    return dict(num_tokens=config.num_generate_tokens, num_samples=config.num_samples,
                seed=config.sample_seed, temperature=config.temperature,
                top_k=config.top_k or None, top_p=config.top_p if config.top_p < 1 else None)


def print_samples(prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> None:
    """One block per sample, prompts in order (stdout, process 0)."""
    if jax.process_index() != 0:
        return
    for prompt, texts in zip(prompts, samples):
        for index, text in enumerate(texts):
            print(f"--- sample {index + 1} of {prompt!r}\n{text}", flush=True)


# ------------------------------------------------------------------------ the tokenizer

def _tokenizer_name(config) -> str:
    return os.path.basename(lm_tokenizer_path("", config.vocab_size, config.tokenizer_type))


def read_tokenizer(config, workdir: str) -> SentencePieceTokenizer:
    """The tokenizer an LM run left in ``workdir``."""
    return read_workdir_tokenizer(workdir, _tokenizer_name(config),
                                  hint=": is it a training run of experiments/lm.py?")


def run_tokenizer(config, workdir: str, texts: Sequence[str]):
    """(tokenizer, bytes to write into the workdir later, or None when it is there already)."""
    return workdir_tokenizer(workdir, _tokenizer_name(config), lambda directory: (
        load_or_train_lm_tokenizer(texts, directory, vocab_size=config.vocab_size,
                                   max_chars=config.tokenizer_max_chars, seed=config.seed,
                                   model_type=config.tokenizer_type)))


# -------------------------------------------------------------------------- training

def make_train_batches(config, corpus: TextCorpus, tokenizer, *, packing: bool, **kwargs):
    """The run's Grain training iterator (``kwargs``: process_index / count, read_options)."""
    kwargs.setdefault("read_options", grain.ReadOptions(num_threads=config.data_threads))
    return train_batches(corpus.train, tokenizer, global_batch_size=config.batch_size,
                         max_len=config.max_len, seed=config.seed, packing_enabled=packing,
                         num_packing_bins=config.num_packing_bins or None, **kwargs)


@dataclasses.dataclass
class Prepared:
    """What :func:`prepare` read and decided; nothing of it is in the workdir yet."""
    corpus: TextCorpus
    tokenizer: Any  # SentencePieceTokenizer, or a checkpoint's CheckpointTokenizer
    tokenizer_bytes: Optional[bytes]
    windows: list
    packing: PackingChoice


def prepare(config, workdir: str, tokenizer=None) -> Prepared:
    """Step 3 of the module docstring: reads data, decides packing, writes nothing.

    ``tokenizer``: a checkpoint's (else the run's SentencePiece model, trained or read).
    """
    corpus = open_corpus(config.dataset, data_dir=config.data_dir,
                         train_split=config.train_split, eval_split=config.eval_split,
                         text_key=config.text_key, eval_fraction=config.eval_fraction,
                         max_files=config.max_files)
    tokenizer_bytes = None
    if tokenizer is None:
        tokenizer, tokenizer_bytes = run_tokenizer(config, workdir, corpus.train)
    windows = eval_windows(corpus.eval, tokenizer, max_len=config.max_len,
                           max_examples=config.max_eval_examples)
    packing = choose_packing(config.packing, lambda packed: make_train_batches(
        config, corpus, tokenizer, packing=packed, **measurement_pipeline()), ("weights",))
    return Prepared(corpus=corpus, tokenizer=tokenizer, tokenizer_bytes=tokenizer_bytes,
                    windows=windows, packing=packing)


def train(config, workdir: str, mesh=None) -> tr.TrainResult:
    """Checks, trains into ``workdir`` (resuming it), prints samples of ``sample_prompts``.

    ``mesh`` defaults to ``config.mesh`` over every device of every host. Bad
    config keys, a workdir of another script or of other data, an empty corpus
    or a checkpoint that does not fit the model are refused (one
    :class:`tfx_jax.errors.UserError`) before anything is written. With
    ``config.init_from`` the run starts from that Hugging Face checkpoint: its
    model, weights and tokenizer, fine-tuned as ``config.finetune`` says.
    """
    mesh = tr.make_mesh(config.mesh) if mesh is None else mesh
    tr.check_workdir(workdir, JOB, config, same=SAME_DATA)
    if config.get("init_from") and has_checkpoint(workdir):  # a resumed fine-tuning run
        before = tr.load_config(workdir).get("finetune")
        require(before == config.get("finetune"), f"workdir {workdir!r} was fine-tuned with "
                f"config.finetune = {before!r}, this run has {config.get('finetune')!r}: use a "
                f"new --workdir, or --config.finetune={before} to resume", WorkdirError)
    check(config, mesh, workdir)
    if tr.compile_target() is not None:  # --compile_topology: the config alone, no data
        compile_only(config, workdir, mesh)
    with workdir_lock(workdir):
        start = checkpoint_start(config, workdir)
        ready = prepare(config, workdir, start and start.tokenizer)
        plan = tr.freeze(config, JOB)  # nothing of an LM run is decided by its data
        model = CausalLM(start.model if start else lm_config(
            plan.model, vocab_size=ready.tokenizer.vocab_size, max_len=plan.max_len))
        pad_id = special_ids(ready.tokenizer).pad
        eval_data = eval_batches(ready.windows, global_batch_size=plan.eval_batch_size,
                                 max_len=plan.max_len, pad_id=pad_id)
        finetuning = finetuning_of(plan)
        task = lm_task(model.config, max_len=plan.max_len, num_eval_examples=len(ready.windows),
                       finetuning=finetuning, logits_chunk=plan.logits_chunk,
                       pretrained_params=start and checkpoint_params(plan, start, workdir, mesh))
        check_checkpoint_fits(workdir, task.init_params)  # reads metadata, writes nothing
        if ready.tokenizer_bytes is not None:  # the first write into the workdir
            write_workdir_file(workdir, _tokenizer_name(plan), ready.tokenizer_bytes)
        if start and not start.copied:
            write_checkpoint_files(workdir, start.files)
        train_iter = run_pipeline(ready.packing) or make_train_batches(
            plan, ready.corpus, ready.tokenizer, packing=ready.packing.enabled)
        trained, total = parameter_counts(task)
        say(f"parameters: {trained:,} trainable of {total:,}"
            + (f" (from {plan.init_from}, finetune={plan.finetune})" if finetuning else ""))
        say(f"{ready.corpus.description}; vocabulary {ready.tokenizer.vocab_size}, rows of "
            f"{plan.max_len} tokens, {len(ready.windows)} held-out windows; "
            f"{plan.num_train_steps} steps of {plan.batch_size} rows")
        say(ready.packing.report(ready.corpus.name))
        result = tr.train(plan, workdir, task, train_iter, eval_batches=eval_data, mesh=mesh)
    if plan.sample_prompts:
        params = finetuning.model_params(result.state.params) if finetuning else (
            result.state.params)
        print_samples(plan.sample_prompts, generate_texts(
            model, params, ready.tokenizer, list(plan.sample_prompts),
            **sampling_kwargs(plan)))
    return result


def compile_only(config, workdir: str, mesh) -> None:
    """``--compile_topology``: compiles the train and eval steps this run would compile on
    the target, from the config alone (:func:`tfx_jax.train.topology.compile_plan`): no
    data is read and nothing but the report is written. Rows of ``max_len`` tokens,
    packed unless ``packing`` is "false", with loss weights; the model of ``config.model``
    with ``vocab_size`` tokens (the tokenizer's upper bound), or of ``init_from``'s
    config.json (its weights are not read: a fine-tuning run's fit is checked before
    the checkpoint is downloaded)."""
    plan = tr.freeze(config, JOB)
    model = (checkpoint_model(plan, plan.init_from) if plan.get("init_from") else
             lm_config(plan.model, vocab_size=plan.vocab_size, max_len=plan.max_len))
    def task_with(model):
        return lm_task(model, max_len=plan.max_len, finetuning=finetuning_of(plan),
                       logits_chunk=plan.logits_chunk)

    task = task_with(model)
    packed = packing_setting(plan.packing) is not False
    features = {key: ((plan.max_len,), "int32") for key in LENGTHS_KEYS}
    trained, total = parameter_counts(task)
    say(f"compiling for {tr.compile_target().name}: {total:,} parameters ({trained:,} "
        f"trainable), rows of {plan.max_len} tokens{' (packed)' if packed else ''}, "
        f"batches of {plan.batch_size} (eval {plan.eval_batch_size}); no data is read")
    tr.compile_plan(plan, workdir, task, mesh, tr.abstract_batch(
        plan.batch_size, features, packed=packed), tr.abstract_batch(
        plan.eval_batch_size, features), with_remat=lambda policy: task_with(
        dataclasses.replace(model, remat_policy=policy)))


# ------------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class TrainedLM:
    """A trained LM from a workdir: its run config, model, parameters and tokenizer."""
    config: object
    model: CausalLM
    params: object
    tokenizer: SentencePieceTokenizer


def load_trained_lm(workdir: str, *, step: Optional[int] = None) -> TrainedLM:
    """The LM trained in ``workdir``: its config.json, tokenizer and parameters only (a run
    from a checkpoint: the model and tokenizer of its ``init_from/`` copy, LoRA merged).

    Raises WorkdirNotFound when the workdir holds no trained LM.
    """
    config = tr.load_config(workdir, job=JOB)
    finetuning = finetuning_of(config)
    if finetuning is None:
        tokenizer = read_tokenizer(config, workdir)
        model = CausalLM(lm_config(config.model, vocab_size=tokenizer.vocab_size,
                                   max_len=config.max_len))
    else:
        files = workdir_checkpoint_files(workdir)
        require(files is not None, f"workdir {workdir!r} has no {CHECKPOINT_DIR}/config.json "
                f"of the checkpoint it was trained from", WorkdirNotFound)
        tokenizer = pretrained.load_tokenizer(files)
        model = CausalLM(checkpoint_model(config, files))
    task = lm_task(model.config, max_len=config.max_len, finetuning=finetuning,
                   logits_chunk=config.get("logits_chunk", 0))
    params = tr.restore_params(workdir, task.init_params, step=step)
    if finetuning is not None:
        params = finetuning.model_params(params)
    return TrainedLM(config=config, model=model, params=params, tokenizer=tokenizer)


def unescape_prompt(line: str) -> str:
    r"""A prompt file's line as a prompt: ``\n`` becomes a newline and ``\\`` a backslash."""
    out, index = [], 0
    while index < len(line):
        pair = line[index:index + 2]
        if pair in ("\\n", "\\\\"):
            out.append("\n" if pair == "\\n" else "\\")
            index += 2
        else:
            out.append(line[index])
            index += 1
    return "".join(out)


def read_prompts(specs: Sequence[str], stdin=None) -> list[str]:
    r"""The prompts of ``--generate`` flags, in order.

    ``"@path"``: one prompt per line of the file; ``"-"``: one per line of
    ``stdin``. In both, ``\n`` (backslash, n) in a line is a newline of the
    prompt, ``\\`` a backslash, and empty lines are skipped. Any other value
    is one prompt as it is. Raises ValueError when no prompt is left and
    FileNotFoundError for a missing file.
    """
    prompts = []
    for spec in specs:
        if spec == "-" or spec.startswith("@"):
            if spec == "-":
                lines = (stdin if stdin is not None else sys.stdin).read().splitlines()
            else:
                path = spec[1:]
                if not os.path.isfile(path):
                    raise DataNotFound(f"--generate={spec}: no prompt file {path!r}")
                lines = read_text_file(path).splitlines()  # DataError naming the file
            prompts += [unescape_prompt(line) for line in lines if line]
        else:
            prompts.append(spec)
    if not prompts:
        raise DataError(f"--generate={','.join(specs)} gave no prompts (empty file or "
                         f"stdin); write one prompt per line")
    return prompts


def load_checkpoint_lm(directory: str) -> TrainedLM:
    """A Hugging Face decoder directory (``pretrained.load_hf``) with its ``tokenizer.json``."""
    cfg, params = pretrained.load_hf(directory)
    if not isinstance(cfg, CausalLMConfig):
        raise ConfigError(f"config.init_from={directory!r} holds a {type(cfg).__name__} "
                          f"checkpoint, not a causal LM")
    return TrainedLM(config=None, model=CausalLM(cfg), params=params,
                     tokenizer=pretrained.load_tokenizer(directory))


def generate(config, workdir: str, prompts: Sequence[str]) -> list[list[str]]:
    """Continues ``prompts`` (all in one batch) with the model trained in ``workdir``, or,
    when it holds no run, with the Hugging Face checkpoint ``config.init_from``; prints them.

    Of ``config`` only the sampling keys (and ``init_from``) apply; they are checked first.
    """
    check_sampling_config(config)
    if not prompts:
        raise DataError("no prompts to continue")
    init_from = config.get("init_from")
    if init_from and not (epath.Path(workdir) / "config.json").exists():
        trained = load_checkpoint_lm(init_from)  # no training run in the workdir
    else:
        trained = load_trained_lm(workdir)
    samples = generate_texts(trained.model, trained.params, trained.tokenizer, list(prompts),
                             **sampling_kwargs(config))
    print_samples(prompts, samples)
    return samples
