"""Sequence transduction with the encoder-decoder Transformer, on top of the models,
the data layer and the training loop.

* ``task``: teacher forcing (:func:`shift_right`), the label-smoothed loss and
  the :class:`tfx_jax.train.Task` of translation.
* ``inference``: :func:`translate` (jit-compiled greedy or beam search with a
  key/value cache) and :func:`translate_texts` for strings.
* ``evaluation``: exact match and sacrebleu BLEU over an evaluation split.

``experiments/translate.py`` is the script that trains, evaluates and
translates with them (docs/translate.md).
"""
from tfx_jax.apps.translation.evaluation import make_evaluate, translate_eval_data, translation_scores
from tfx_jax.apps.translation.inference import translate, translate_texts
from tfx_jax.apps.translation.task import (make_init_params, make_loss_fn, shift_right,
                                      transformer_config, translation_task)

__all__ = [
    "make_evaluate", "make_init_params", "make_loss_fn", "shift_right", "transformer_config",
    "translate", "translate_eval_data", "translate_texts", "translation_scores",
    "translation_task",
]
