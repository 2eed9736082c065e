"""Image classification with the Vision Transformer: the training Task and inference.

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
* :meth:`Classifier.probabilities` / :meth:`Classifier.predict` classify images.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tfx_jax import train as tr
from tfx_jax.train.flops import training_flops, vit_forward_flops
from tfx_jax.vit import ViT, ViTConfig


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
    """The :class:`ViTConfig` of an experiment config.

    Reads ``config.model`` (patch_size, d_model, num_heads, num_layers, d_ff,
    dropout_rate, pool, dtype, ...: any :class:`ViTConfig` field) and the data
    keys ``config.image_shape`` (H, W, C; square images) and
    ``config.num_classes``, which the training script sets from the dataset.
    """
    for key in ("image_shape", "num_classes"):
        if config.get(key) is None:
            raise ValueError(f"config.{key} is not set; the training script fills it from "
                             f"the dataset (config.dataset)")
    height, width, channels = (int(d) for d in config.image_shape)
    if height != width:
        raise ValueError(f"ViT needs square images, config.image_shape = "
                         f"{tuple(config.image_shape)}; set config.image_size to resize")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(config.model) - fields)
    if unknown:
        raise ValueError(f"config.model has keys {unknown} that ViTConfig does not know; "
                         f"known: {sorted(fields)}")
    return ViTConfig(image_size=height, num_channels=channels,
                     num_classes=int(config.num_classes), **config.model.to_dict())


def classification_task(model: ViT, *, label_smoothing: float = 0.0) -> tr.Task:
    """The training Task of an image classifier on ``{"image", "label", "valid"}`` batches.

    The loss is the (label-smoothed) cross-entropy averaged over the valid
    examples (padding rows of the last eval batch count 0); metrics are
    ``accuracy`` and ``weight`` (the number of valid examples).
    """
    cfg = model.config
    image_shape = (cfg.image_size, cfg.image_size, cfg.num_channels)

    def init_params(rng):
        return model.init({"params": rng}, jnp.zeros((1, *image_shape), jnp.float32))["params"]

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["image"], deterministic=not train,
                             rngs={"dropout": rng})
        valid = batch["valid"]
        loss = tr.classification_cross_entropy(logits, batch["label"],
                                               label_smoothing=label_smoothing, weights=valid)
        accuracy = tr.classification_accuracy(logits, batch["label"], weights=valid)
        return loss, {"accuracy": accuracy, "weight": valid.sum().astype(jnp.float32)}

    tokens = cfg.num_patches + (cfg.pool == "cls")  # patches (+ [CLS]) per image
    return tr.Task(init_params=init_params, loss_fn=loss_fn,
                   flops_per_example=training_flops(vit_forward_flops(cfg)),
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
    config = tr.load_config(workdir)
    model = ViT(vit_config(config))
    task = classification_task(model)
    params = tr.restore_params(workdir, task.init_params, step=step)
    return Classifier(model=model, params=params, class_names=class_names_of(config))


def format_predictions(paths: Sequence[str], labels: np.ndarray, probabilities: np.ndarray,
                       class_names: Sequence[str]) -> list[str]:
    """One line per file: ``path: label (p=0.973)``."""
    return [f"{path}: {class_names[int(label)]} (p={float(prob):.3f})"
            for path, label, prob in zip(paths, labels, probabilities)]
