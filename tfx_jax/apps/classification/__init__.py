"""Image classification with :class:`tfx_jax.ViT`: the Task, inference, the run.

* ``task``: :func:`vit_config` from an experiment config, the
  :class:`tfx_jax.train.Task` (:func:`classification_task`), a trained
  :class:`Classifier` from its workdir (:func:`load_classifier`) and
  fine-tuning from released weights (:func:`setup_finetuning`).
* ``experiment``: the whole run, checked before anything is written
  (:func:`train`), and :func:`predict` / :func:`draw_attention_maps` for a
  trained workdir.

``experiments/vit.py`` is the thin script over ``experiment`` (docs/vision.md);
the DALL-E app asks a trained :class:`Classifier` what its images show.
"""
from tfx_jax.apps.classification.task import (ARCHITECTURE_FIELDS, JOB, Classifier,
                                              class_names_of, classification_task,
                                              finetuning_of, format_predictions,
                                              load_classifier, load_pretrained_vit,
                                              load_splits, setup_finetuning, vit_config)

__all__ = [
    "ARCHITECTURE_FIELDS", "Classifier", "JOB", "class_names_of", "classification_task",
    "finetuning_of", "format_predictions", "load_classifier", "load_pretrained_vit",
    "load_splits", "setup_finetuning", "vit_config",
]
