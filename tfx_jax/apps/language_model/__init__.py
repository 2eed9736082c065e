"""GPT-style language modelling with :class:`tfx_jax.CausalLM`: corpus, pipeline, task, sampling.

* ``corpus``: the built-in corpus (the Python standard library's source), a
  directory of text files, or a TFDS dataset such as lm1b.
* ``pipeline``: SentencePiece tokenizer, packed training rows, eval windows.
* ``task``: next-token loss, perplexity, the :class:`tfx_jax.train.Task`, and
  :func:`load_trained_lm` for a trained workdir.
* ``sampling``: temperature / top-k / top-p (nucleus) sampling with the KV cache.

``experiments/lm.py`` trains, evaluates and samples with them (docs/lm.md).
"""
from tfx_jax.apps.language_model.corpus import STDLIB, TextCorpus, open_corpus, stdlib_corpus
from tfx_jax.apps.language_model.pipeline import (eval_batches, eval_windows,
                                                  load_or_train_lm_tokenizer, train_batches)
from tfx_jax.apps.language_model.sampling import generate_texts
from tfx_jax.apps.language_model.task import (TrainedLM, lm_config, lm_task, load_trained_lm,
                                              make_evaluate, make_loss_fn)

__all__ = [
    "STDLIB", "TextCorpus", "TrainedLM", "eval_batches", "eval_windows", "generate_texts",
    "lm_config", "lm_task", "load_or_train_lm_tokenizer", "load_trained_lm", "make_evaluate",
    "make_loss_fn", "open_corpus", "stdlib_corpus", "train_batches",
]
