"""GPT-style language modelling with :class:`tfx_jax.CausalLM`: corpus, pipeline, task, sampling.

* ``corpus``: the built-in corpus (the Python standard library's source), a
  directory of text files, a JSONL of prompt/response examples, or a TFDS dataset
  such as lm1b.
* ``pipeline``: SentencePiece tokenizer, packed training rows with loss weights
  (responses only for prompt/response examples), eval windows.
* ``task``: next-token loss, perplexity and the :class:`tfx_jax.train.Task`.
* ``sampling``: temperature / top-k / top-p (nucleus) sampling with the KV
  cache, every prompt in one left-padded batch.
* ``experiment``: the whole run, checked before anything is written
  (:func:`train`; from a Hugging Face checkpoint with ``config.init_from``, full or
  LoRA fine-tuning), and :func:`load_trained_lm` / :func:`generate` /
  :func:`read_prompts` for a trained workdir.

``experiments/lm.py`` is the thin script over ``experiment`` (docs/lm.md).
"""
from tfx_jax.apps.language_model.corpus import STDLIB, TextCorpus, open_corpus, stdlib_corpus
from tfx_jax.apps.language_model.pipeline import (eval_batches, eval_windows,
                                                  load_or_train_lm_tokenizer, train_batches)
from tfx_jax.apps.language_model.sampling import generate_ids, generate_texts
from tfx_jax.apps.language_model.task import lm_config, lm_task, make_loss_fn
from tfx_jax.apps.language_model.experiment import (TrainedLM, check, generate,
                                                    load_trained_lm, read_prompts, train)

__all__ = [
    "STDLIB", "TextCorpus", "TrainedLM", "check", "eval_batches", "eval_windows",
    "generate", "generate_ids", "generate_texts", "lm_config", "lm_task",
    "load_or_train_lm_tokenizer", "load_trained_lm", "make_loss_fn",
    "open_corpus", "read_prompts", "stdlib_corpus", "train", "train_batches",
]
