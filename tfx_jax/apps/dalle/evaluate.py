"""Scoring generated images so that the score cannot be gamed.

A text-to-image model should draw what the prompt asks, draw it differently
each time, and not just replay its training set. Each has a measurement:

* **accuracy**: a separately trained classifier (a ViT trained on real images
  only, never on samples) labels each generated image; the score is the
  fraction labelled as the prompted digit. ``real_accuracy`` is the same
  classifier on real test images passed through the image tokenizer, the
  ceiling the tokenizer allows.
* **diversity**: the mean pairwise distance (mean absolute pixel difference,
  in units of the full 0..255 range) between samples for the same prompt,
  next to the same figure for real test images of that class
  (``diversity_ratio`` = samples / real; near 1 is real-like variety, near 0 is
  one image repeated), and the fraction of distinct images among the samples.
* **copying**: the fraction of samples identical to a training image (both
  seen through the tokenizer). A model that memorised its data would score
  high on the first two and be caught here.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from etils import epath

from tfx_jax.errors import ConfigError
from tfx_jax.apps.classification import Classifier
from tfx_jax.apps.dalle.generate import generate_images
from tfx_jax.apps.dalle.image_tokens import ImageTokenizer
from tfx_jax.apps.dalle.prompts import DigitPrompts
from tfx_jax.data.image_datasets import ImageDataset
from tfx_jax.data.image_preprocess import normalize_images
from tfx_jax.lm import CausalLM

MAX_IMAGES_FOR_DISTANCES = 256  # pairwise distances of a random subset above this


def evaluation_prompts(prompts: DigitPrompts) -> list[tuple[int, str]]:
    """One prompt per digit 0-9, cycling through the templates and word/numeral forms."""
    return [(digit, prompts.prompt(digit, digit % len(prompts.templates),
                                   numeral=bool(digit % 2)))
            for digit in range(10)]


def mean_pairwise_distance(images: np.ndarray, *, seed: int = 0) -> float:
    """Mean over pairs i < j of mean |image_i - image_j| / 255 (0 = identical, 1 = opposite).

    At most ``MAX_IMAGES_FOR_DISTANCES`` images (a seeded random subset) are compared.
    """
    images = np.asarray(images)
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for pairwise distances, got {len(images)}")
    if len(images) > MAX_IMAGES_FOR_DISTANCES:
        keep = np.random.default_rng(seed).choice(len(images), MAX_IMAGES_FOR_DISTANCES,
                                                  replace=False)
        images = images[keep]
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    distances = np.abs(flat[:, None, :] - flat[None, :, :]).mean(-1)
    upper = np.triu_indices(len(flat), k=1)
    return float(distances[upper].mean())


def _image_keys(images: np.ndarray) -> list[bytes]:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return [image.tobytes() for image in images]


def score_generated_images(images: np.ndarray, labels: Sequence[int], classifier: Classifier,
                           *, real_images: np.ndarray, real_labels: np.ndarray,
                           train_images: np.ndarray, texts: Sequence[str] | None = None
                           ) -> dict[str, Any]:
    """Scores samples uint8 [prompts, samples, H, W, C] drawn for digit ``labels`` [prompts].

    Args:
      images: the generated images, one row per prompt.
      labels: the digit each row's prompt asked for.
      classifier: a classifier trained on real images (:func:`load_classifier`).
      real_images, real_labels: real test images (as the tokenizer reconstructs
        them) and their labels, for the reference figures.
      train_images: the training images as the tokenizer reconstructs them
        (to detect copies).
      texts: the prompt texts, for the per-prompt report.

    Returns:
      A dict of the scalar metrics (``accuracy``, ``real_accuracy``,
      ``sample_diversity``, ``real_diversity``, ``diversity_ratio``,
      ``distinct_fraction``, ``copied_fraction``, ``num_samples``) and
      ``per_prompt``: a list with each prompt's figures.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 5 or images.shape[0] != len(labels) or images.shape[1] < 2:
        raise ValueError(f"images must be [prompts={len(labels)}, samples >= 2, H, W, C], "
                         f"got {images.shape}")
    if tuple(images.shape[2:]) != classifier.image_shape:
        raise ConfigError(f"generated images {images.shape[2:]} do not fit the classifier's "
                         f"input {classifier.image_shape}")
    num_prompts, num_samples = images.shape[:2]
    predicted, _ = classifier.predict(normalize_images(images.reshape(-1, *images.shape[2:])))
    predicted = predicted.reshape(num_prompts, num_samples)
    real_predicted, _ = classifier.predict(normalize_images(real_images))
    train_keys = set(_image_keys(train_images))
    per_prompt = []
    for row, label in enumerate(labels):
        keys = _image_keys(images[row])
        real_of_class = real_images[np.asarray(real_labels) == label]
        per_prompt.append({
            "label": int(label),
            "prompt": None if texts is None else texts[row],
            "accuracy": float(np.mean(predicted[row] == label)),
            "predicted_counts": np.bincount(predicted[row], minlength=10).tolist(),
            "sample_diversity": mean_pairwise_distance(images[row]),
            "real_diversity": mean_pairwise_distance(real_of_class),
            "distinct_images": len(set(keys)),
            "copied_images": sum(key in train_keys for key in keys),
        })
    sample_diversity = float(np.mean([p["sample_diversity"] for p in per_prompt]))
    real_diversity = float(np.mean([p["real_diversity"] for p in per_prompt]))
    total = num_prompts * num_samples
    return {
        "accuracy": float(np.mean(predicted == labels[:, None])),
        "real_accuracy": float(np.mean(real_predicted == real_labels)),
        "sample_diversity": sample_diversity,
        "real_diversity": real_diversity,
        "diversity_ratio": sample_diversity / max(real_diversity, 1e-12),
        "distinct_fraction": sum(p["distinct_images"] for p in per_prompt) / total,
        "copied_fraction": sum(p["copied_images"] for p in per_prompt) / total,
        "num_samples": total,
        "per_prompt": per_prompt,
    }


def dataset_arrays(dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """All of a (small) split in memory: uint8 images [N, H, W, C] and int32 labels [N]."""
    examples = [dataset[i] for i in range(len(dataset))]
    return (np.stack([e["image"] for e in examples]),
            np.asarray([e["label"] for e in examples], np.int32))


def evaluate_generator(model: CausalLM, params: Any, prompts: DigitPrompts,
                       image_tokenizer: ImageTokenizer, classifier: Classifier, *,
                       train_images: np.ndarray, test_images: np.ndarray,
                       test_labels: np.ndarray, num_samples: int, seed: int = 0,
                       temperature: float = 1.0, top_k: Optional[int] = None
                       ) -> tuple[dict[str, Any], np.ndarray]:
    """Generates ``num_samples`` images for each of the 10 `evaluation_prompts` and scores them.

    Returns the report of :func:`score_generated_images` (plus the sampling
    settings) and the images uint8 [10, num_samples, H, W, C].
    """
    labels, texts = zip(*evaluation_prompts(prompts))
    images = generate_images(model, params, prompts, image_tokenizer, texts,
                             num_samples=num_samples, seed=seed, temperature=temperature,
                             top_k=top_k)
    through_tokenizer = lambda x: image_tokenizer.decode(image_tokenizer.encode(x))  # noqa: E731
    report = score_generated_images(
        images, labels, classifier, real_images=through_tokenizer(test_images),
        real_labels=test_labels, train_images=through_tokenizer(train_images), texts=texts)
    report["sampling"] = {"seed": seed, "temperature": temperature, "top_k": top_k,
                          "samples_per_prompt": num_samples}
    return report, images


def scalar_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers for a metrics.jsonl eval line (no per-prompt lists)."""
    return {k: v for k, v in report.items() if isinstance(v, (int, float))}


REPORT_FILE = "generation_eval.json"


def write_report(workdir: str, report: dict[str, Any], step: int) -> str:
    """Writes ``<workdir>/generation_eval.json`` (process 0 only); returns its path."""
    path = epath.Path(workdir) / REPORT_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": int(step), **report}, indent=2) + "\n")
    return os.fspath(path)


def generation_evaluate_fn(model: CausalLM, prompts: DigitPrompts,
                           image_tokenizer: ImageTokenizer, classifier: Classifier, *,
                           workdir: str, **evaluate_kwargs) -> Callable:
    """A ``Task.evaluate(params, step, mesh)`` running :func:`evaluate_generator`.

    It writes the full report to ``<workdir>/generation_eval.json`` and returns
    the scalar metrics for the eval line. ``evaluate_kwargs`` are those of
    :func:`evaluate_generator` (data arrays, ``num_samples``, sampling settings).
    """
    def evaluate(params, step, mesh):
        del mesh  # parameters are replicated; sampling runs on them as they are
        report, _ = evaluate_generator(model, params, prompts, image_tokenizer, classifier,
                                       **evaluate_kwargs)
        write_report(workdir, report, step)
        return scalar_metrics(report)
    return evaluate
