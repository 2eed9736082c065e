"""Image classification with the Vision Transformer: the model, the Task and inference.

ViT (Dosovitskiy et al. 2021) is trained like any classifier: cross-entropy
of the [CLS] head's logits against the label, optionally label-smoothed (the
paper fine-tunes without smoothing; DeiT and later ViT recipes use 0.1). The
pieces here are shared by ``experiments/vit.py`` (training, prediction,
attention maps) and by the DALL-E-style generator's evaluation, which asks a
trained classifier what digit a generated image shows:

* :func:`vit_config` builds the model from an experiment config (``config.model``
  plus the input shape and class count the dataset fixed at training time);
* :func:`classification_task` is the :class:`tfx_jax.train.Task`;
* :func:`load_classifier` rebuilds a trained model from its workdir
  (``config.json`` + the latest checkpoint's parameters);
* :func:`load_pretrained_vit` / :func:`setup_finetuning` start a run from
  released weights (``config.init_from``: a ViT .npz or a Hugging Face
  directory) with a new head, in one of the :class:`FineTuning` modes
  (``config.finetune``: "full", "frozen" backbone, "lora");
* :meth:`Classifier.probabilities` / :meth:`Classifier.predict` classify images.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfx_jax import pretrained
from tfx_jax import train as tr
from tfx_jax.data.image_datasets import load_image_dataset
from tfx_jax.errors import ConfigError, DataError, DataNotFound, require
from tfx_jax.model_config import from_config_dict
from tfx_jax.train.finetune import MODES, FineTuning
from tfx_jax.train.state import EvaluateFn
from tfx_jax.train.perf import training_flops, vit_forward_flops
from tfx_jax.vit import ViT, ViTConfig

# ViTConfig fields a checkpoint fixes (written into config.model by setup_finetuning).
JOB = "vit"  # the script of such workdirs: experiments/vit.py
ARCHITECTURE_FIELDS = ("patch_size", "d_model", "num_heads", "num_layers", "d_ff", "pool",
                       "representation_size", "activation", "layer_norm_epsilon", "pre_norm",
                       "use_bias")


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
    """The :class:`ViTConfig` of an experiment config.

    Reads ``config.model`` (patch_size, d_model, num_heads, num_layers, d_ff,
    dropout_rate, pool, dtype, ...: any :class:`ViTConfig` field) and the data
    keys ``config.image_shape`` (H, W, C; square images) and
    ``config.num_classes``, which the training script sets from the dataset.
    """
    for key in ("image_shape", "num_classes"):
        require(config.get(key) is not None, f"config.{key} is not set; the training run "
                f"takes it from the dataset (config.dataset)")
    height, width, channels = (int(d) for d in config.image_shape)
    if height != width:
        raise ConfigError(f"ViT needs square images, config.image_shape = "
                         f"{tuple(config.image_shape)}; set config.image_size to resize")
    return from_config_dict(ViTConfig, config.model, image_size=height, num_channels=channels,
                            num_classes=int(config.num_classes))


def classification_task(config: ViTConfig, *, label_smoothing: float = 0.0,
                        finetuning: Optional[FineTuning] = None,
                        pretrained_params: Any = None,
                        evaluate: Optional[EvaluateFn] = None) -> tr.Task:
    """The training Task of a ViT classifier on ``{"image", "label", "valid"}`` batches.

    The loss is the (label-smoothed) cross-entropy averaged over the valid
    examples (padding rows of the last eval batch count 0); metrics are
    ``accuracy`` and ``weight`` (the number of valid examples).

    With ``finetuning``, training starts from ``pretrained_params`` (or, when
    None, from parameters of the same structure, e.g. to restore a checkpoint)
    and only the parameters its mode marks trainable are updated.
    """
    model = ViT(config)
    image_shape = (config.image_size, config.image_size, config.num_channels)

    def init_params(rng):
        return model.init({"params": rng}, jnp.zeros((1, *image_shape), jnp.float32))["params"]

    model_params = lambda params: params  # noqa: E731
    trainable = None
    if finetuning is not None:
        init_params = finetuning.init_params(init_params, pretrained_params)
        model_params, trainable = finetuning.model_params, finetuning.trainable

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": model_params(params)}, batch["image"],
                             deterministic=not train, rngs={"dropout": rng})
        valid = batch["valid"]
        loss = tr.classification_cross_entropy(logits, batch["label"],
                                               label_smoothing=label_smoothing, weights=valid)
        accuracy = tr.classification_accuracy(logits, batch["label"], weights=valid)
        return loss, {"accuracy": accuracy, "weight": valid.sum().astype(jnp.float32)}

    tokens = config.num_patches + (config.pool == "cls")  # patches (+ [CLS]) per image
    return tr.Task(init_params=init_params, loss_fn=loss_fn, evaluate=evaluate,
                   trainable=trainable,
                   flops_per_example=training_flops(vit_forward_flops(config)),
                   count_tokens=lambda batch: tokens * int(np.sum(batch["valid"])))


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained classifier: model, parameters, and what its inputs and outputs mean."""
    model: ViT
    params: Any
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.model.config
        return (cfg.image_size, cfg.image_size, cfg.num_channels)

    def probabilities(self, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """float32 [N, classes]: softmax of the logits for normalised images [N, H, W, C]."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must have shape [N, {', '.join(map(str, self.image_shape))}]"
                             f", got {images.shape}")
        outputs = [np.asarray(_softmax_logits(self.model, self.params,
                                              images[start:start + batch_size]))
                   for start in range(0, len(images), batch_size)]
        if not outputs:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(outputs)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int [N], their probabilities float [N]) for normalised images."""
        probs = self.probabilities(images)
        labels = probs.argmax(-1)
        return labels, probs[np.arange(len(labels)), labels]


@functools.partial(jax.jit, static_argnums=0)
def _softmax_logits(model, params, images):
    return jax.nn.softmax(model.apply({"params": params}, images), axis=-1)


def class_names_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.class_names`` if the run stored them, else the label numbers as strings."""
    names = config.get("class_names")
    return tuple(names) if names else tuple(str(i) for i in range(int(config.num_classes)))


def load_classifier(workdir: str, *, step: int | None = None) -> Classifier:
    """Rebuilds the classifier trained in ``workdir`` (its config.json and checkpoint).

    Raises:
      FileNotFoundError: no config.json or no checkpoint in the workdir.
      ValueError: the checkpoint does not fit the stored config.
    """
    config = tr.load_config(workdir, job=JOB)
    model_config = vit_config(config)
    finetuning = finetuning_of(config)
    task = classification_task(model_config, finetuning=finetuning)
    params = tr.restore_params(workdir, task.init_params, step=step)
    if finetuning is not None:
        params = finetuning.model_params(params)
    return Classifier(model=ViT(model_config), params=params,
                      class_names=class_names_of(config))


def finetuning_of(config: ml_collections.ConfigDict) -> Optional[FineTuning]:
    """The :class:`FineTuning` of a run that starts from ``config.init_from``, else None."""
    if not config.get("init_from"):
        return None
    mode = config.get("finetune", "full")
    if mode not in MODES:
        raise ConfigError(f"config.finetune must be one of {MODES}, got {mode!r}")
    return FineTuning(mode=mode, lora_rank=int(config.get("lora_rank", 8)),
                      lora_alpha=float(config.get("lora_alpha", 16.0)))


def load_pretrained_vit(path: str, *, num_classes: Optional[int] = None,
                        image_size: Optional[int] = None,
                        num_channels: Optional[int] = None) -> tuple[ViTConfig, Any]:
    """A released ViT (.npz file or Hugging Face directory) made ready for a new task.

    ``num_classes`` attaches a new zero head, ``image_size`` resizes the
    position embeddings (see :mod:`tfx_jax.pretrained`). ``num_channels=1``
    fine-tunes an RGB checkpoint on grayscale images: the patch kernel is
    summed over its input channels, which is exactly feeding the gray image
    repeated in the three channels.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg, params = pretrained.load_hf(path)
    elif os.path.isfile(path) and path.endswith(".npz"):
        cfg, params = pretrained.load_vit_npz(path)
    else:
        raise DataNotFound(f"init_from={path!r} is neither a .npz ViT checkpoint nor a "
                                f"Hugging Face model directory")
    if not isinstance(cfg, ViTConfig):
        raise DataError(f"init_from={path!r} holds a {type(cfg).__name__}, not a ViT")
    cfg, flat = pretrained.vit_adapt.adapt_vit(cfg, pretrained.tree.flatten(params),
                                               num_classes=num_classes, image_size=image_size)
    if num_channels is not None and num_channels != cfg.num_channels:
        if num_channels != 1:
            raise DataError(f"the checkpoint takes {cfg.num_channels}-channel images; images "
                             f"with {num_channels} channels cannot be fed to it")
        flat["patch_embedding/kernel"] = flat["patch_embedding/kernel"].sum(axis=2,
                                                                            keepdims=True)
        cfg = cfg.replace(num_channels=1)
    return cfg, pretrained.tree.unflatten(flat)


def setup_finetuning(config: ml_collections.ConfigDict, num_classes: int,
                     num_channels: int) -> tuple[Optional[FineTuning], Any, dict]:
    """Reads ``config.init_from`` (if set): ``(FineTuning, parameters, decided)``, else
    ``(None, None, {})``.

    ``decided`` holds what the checkpoint fixes, as keys for the run's plan
    (:func:`tfx_jax.train.freeze`, kept in its config.json, so
    :func:`load_classifier` rebuilds the model): ``config.model``'s
    architecture fields and, when unset, ``image_size`` (the checkpoint's
    resolution; a set one resizes the position embeddings instead).
    """
    finetuning = finetuning_of(config)
    if finetuning is None:
        return None, None, {}
    cfg, params = load_pretrained_vit(config.init_from, num_classes=num_classes,
                                      image_size=config.get("image_size"),
                                      num_channels=num_channels)
    decided = {f"model.{field}": getattr(cfg, field) for field in ARCHITECTURE_FIELDS}
    if config.get("image_size") is None:
        decided["image_size"] = cfg.image_size
    if config.model.get("scan_layers"):
        params = pretrained.to_scan(params, "encoder", cfg.num_layers)
    return finetuning, params, decided


def load_splits(config) -> tuple:
    """(train, eval) :class:`tfx_jax.data.image_datasets.ImageDataset` of ``config.dataset``."""
    return tuple(load_image_dataset(config.dataset, split, data_dir=config.data_dir)
                 for split in (config.train_split, config.eval_split))


def format_predictions(paths: Sequence[str], labels: np.ndarray, probabilities: np.ndarray,
                       class_names: Sequence[str]) -> list[str]:
    """One line per file: ``path: label (p=0.973)``."""
    return [f"{path}: {class_names[int(label)]} (p={float(prob):.3f})"
            for path, label, prob in zip(paths, labels, probabilities)]
