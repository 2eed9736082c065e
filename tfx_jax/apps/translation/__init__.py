"""Sequence transduction with the encoder-decoder Transformer, on top of the models,
the data layer and the training loop.

* ``task``: teacher forcing (:func:`shift_right`), the label-smoothed loss and
  the :class:`tfx_jax.train.Task` of translation.
* ``inference``: :func:`translate` (jit-compiled greedy or beam search with a
  key/value cache) and :func:`translate_texts` for strings.
* ``evaluation``: exact match and sacrebleu BLEU over an evaluation split.
* ``data``: which pairs a config trains, evaluates and tests on (a held-out
  split of a lone ``train_data`` file, TSV header / BOM notes).
* ``experiment``: the whole run, checked before anything is written
  (:func:`train_and_test`), and :func:`load_translator` /
  :func:`translate_lines` for a trained workdir.

``experiments/translate.py`` is the thin script over ``experiment``
(docs/translate.md).
"""
from tfx_jax.apps.translation.data import TranslationData, open_data
from tfx_jax.apps.translation.evaluation import make_evaluate, translate_eval_data, translation_scores
from tfx_jax.apps.translation.inference import translate, translate_texts
from tfx_jax.apps.translation.task import (make_init_params, make_loss_fn, shift_right,
                                      transformer_config, translation_task)
from tfx_jax.apps.translation.experiment import (Translator, load_translator, train_and_test,
                                                 translate_lines)

__all__ = [
    "TranslationData", "Translator", "load_translator", "open_data", "train_and_test",
    "translate_lines", "make_evaluate", "make_init_params", "make_loss_fn", "shift_right", "transformer_config",
    "translate", "translate_eval_data", "translate_texts", "translation_scores",
    "translation_task",
]
