"""The DALL-E-style generator's experiment: check, resolve, train; generate and evaluate.

:func:`train` is what ``experiments/dalle.py`` runs, in the order of the other
apps: :func:`check` (the config alone: training keys, image tokenizer, the
classifier workdir's script), the workdir (another script's is refused), the
datasets, the plan (:func:`tfx_jax.train.freeze` with the image shape the
dataset decides), one Task, then :func:`tfx_jax.train.train`.
:func:`generate` and :func:`evaluate` read the model and tokenizer from the
workdir (config.json, patch_vq.npz, the latest checkpoint).
"""
from __future__ import annotations

import dataclasses
import os
import re

from etils import epath

from tfx_jax import train as tr
from tfx_jax.apps.classification import JOB as CLASSIFIER_JOB
from tfx_jax.apps.classification import load_classifier, load_splits
from tfx_jax.apps.dalle.evaluate import (dataset_arrays, evaluate_generator,
                                         generation_evaluate_fn, scalar_metrics, write_report)
from tfx_jax.apps.dalle.generate import generate_images, save_image_grid
from tfx_jax.apps.dalle.input_pipeline import eval_generator_batches, train_generator_batches
from tfx_jax.apps.dalle.joint_sequence import JointLayout
from tfx_jax.apps.dalle.prompts import DigitPrompts
from tfx_jax.apps.dalle.task import (IMAGE_TOKENIZERS, generator_config, generator_task,
                                     image_tokenizer_from_config, load_generator)
from tfx_jax.data.digits import DIGITS_IMAGE_SHAPE
from tfx_jax.errors import ConfigError, require, say
from tfx_jax.lm import CausalLM
from tfx_jax.train.checkpoint import workdir_lock

JOB = "dalle"


def sampling_kwargs(config) -> dict:
    return dict(num_samples=config.samples_per_prompt, seed=config.sample_seed,
                temperature=config.temperature, top_k=config.top_k or None)


def check(config, mesh) -> None:
    """One UserError naming the first bad key or workdir; reads no data, writes nothing."""
    tr.validate_config(config)
    tr.check_batch_size(config.batch_size, mesh)
    require(config.image_tokenizer in IMAGE_TOKENIZERS, f"config.image_tokenizer must be one "
            f"of {IMAGE_TOKENIZERS}, got {config.image_tokenizer!r}")
    if config.classifier_workdir:  # a classifier of experiments/vit.py, before any data
        tr.check_workdir(config.classifier_workdir, CLASSIFIER_JOB)


def evaluation_data(config) -> dict:
    """The arrays the generation scores compare with (training and test images)."""
    train_data, test_data = load_splits(config)
    train_images, _ = dataset_arrays(train_data)
    test_images, test_labels = dataset_arrays(test_data)
    return dict(train_images=train_images, test_images=test_images, test_labels=test_labels)


def train(config, workdir: str, mesh=None) -> tr.TrainResult:
    """Trains into ``workdir``; ``mesh`` defaults to ``config.mesh`` over every device.

    The workdir's lock is held from before the data is read: the patch codebook
    (``patch_vq.npz``) is the run's first write.
    """
    mesh = tr.make_mesh(config.mesh) if mesh is None else mesh
    check(config, mesh)
    if tr.compile_target() is not None:  # --compile_topology: the config alone, no data
        compile_only(config, workdir, mesh)
    tr.check_workdir(workdir, JOB)
    with workdir_lock(workdir):
        return _train(config, workdir, mesh, *load_splits(config))


def compile_only(config, workdir: str, mesh) -> None:
    """``--compile_topology``: compiles the train and eval steps this run would compile on
    the target, from the config alone (:func:`tfx_jax.train.topology.compile_plan`): no
    images are read, no codebook is fitted, nothing but the report is written. Images of
    ``config.image_shape`` (default the digits' 8 x 8 x 1) as ``num_gray_levels`` levels
    per pixel, or ``codebook_size`` codes per ``vq_patch_size`` patch (an upper bound: a
    fitted codebook merges equal codes)."""
    shape = tuple(config.image_shape or DIGITS_IMAGE_SHAPE)
    prompts = DigitPrompts()
    if config.image_tokenizer == "gray_levels":
        image_length, codes = shape[0] * shape[1], config.num_gray_levels
    else:
        patch = config.vq_patch_size
        image_length, codes = (shape[0] // patch) * (shape[1] // patch), config.codebook_size
    layout = JointLayout(text_vocab_size=prompts.vocab_size, image_vocab_size=codes,
                         max_text_length=prompts.max_length, image_length=image_length)
    plan = tr.freeze(config, JOB, image_shape=shape)
    model = generator_config(plan, layout)
    task = generator_task(model, layout=layout)
    features = {"tokens": ((layout.sequence_length,), "int32"),
                "weights": ((layout.sequence_length,), "float32")}
    say(f"compiling for {tr.compile_target().name}: images {shape} as {image_length} "
        f"{plan.image_tokenizer} tokens, sequences of {layout.sequence_length}, batches of "
        f"{plan.batch_size}; no data is read")
    batch = tr.abstract_batch(plan.batch_size, features)
    tr.compile_plan(plan, workdir, task, mesh, batch, batch, with_remat=lambda policy: (
        generator_task(dataclasses.replace(model, remat_policy=policy), layout=layout)))


def _train(config, workdir: str, mesh, train_data, eval_data) -> tr.TrainResult:
    plan = tr.freeze(config, JOB, image_shape=tuple(train_data.image_shape))
    train_images, _ = dataset_arrays(train_data)
    image_tokenizer = image_tokenizer_from_config(plan, workdir, train_images)
    prompts = DigitPrompts()
    layout = JointLayout.for_tokenizers(prompts, image_tokenizer)
    model_config = generator_config(plan, layout)
    evaluate = None
    if plan.classifier_workdir:
        evaluate = generation_evaluate_fn(
            CausalLM(model_config), prompts, image_tokenizer,
            load_classifier(plan.classifier_workdir), workdir=workdir,
            **evaluation_data(plan), **sampling_kwargs(plan))
    task = generator_task(model_config, layout=layout, evaluate=evaluate)
    tokens = dict(prompts=prompts, image_tokenizer=image_tokenizer,
                  global_batch_size=plan.batch_size, text_loss_weight=plan.text_loss_weight)
    train_iter = train_generator_batches(train_data, seed=plan.seed, **tokens)
    eval_batches = lambda: eval_generator_batches(eval_data, **tokens)  # noqa: E731
    say(f"{plan.dataset}: {len(train_data)} train images as {layout.image_length} "
        f"{plan.image_tokenizer} tokens ({layout.image_vocab_size} codes); sequences of "
        f"{layout.sequence_length} tokens, vocabulary {layout.vocab_size}")
    return tr.train(plan, workdir, task, train_iter, eval_batches=eval_batches, mesh=mesh)


def generate(config, workdir: str, texts: list[str], output: str | None) -> None:
    """A PNG grid of samples, one row per prompt."""
    generator = load_generator(workdir)
    images = generate_images(generator.model, generator.params, generator.prompts,
                             generator.image_tokenizer, texts, **sampling_kwargs(config))
    if output is None:
        slug = re.sub(r"[^a-z0-9]+", "_", texts[0].lower()).strip("_")
        output = os.fspath(epath.Path(workdir) / "generated" / f"{slug}.png")
    save_image_grid(output, images, texts)
    print(f"{len(texts)} prompt(s) x {images.shape[1]} samples -> {output}")


def evaluate(config, workdir: str) -> None:
    """Scores the generator with the classifier of ``config.classifier_workdir``."""
    if not config.classifier_workdir:
        raise ConfigError("--evaluate needs --config.classifier_workdir: the workdir of a "
                          "trained ViT digit classifier (experiments/vit.py)")
    generator = load_generator(workdir)
    classifier = load_classifier(config.classifier_workdir)
    trained = tr.load_config(workdir, job=JOB)
    report, _ = evaluate_generator(generator.model, generator.params, generator.prompts,
                                   generator.image_tokenizer, classifier,
                                   **evaluation_data(trained), **sampling_kwargs(config))
    checkpointer = tr.Checkpointer(workdir)
    step = checkpointer.latest_step()
    checkpointer.close()
    path = write_report(workdir, report, step)
    writer = tr.MetricsWriter(workdir, start_step=step)
    record = writer.write(step, "eval", scalar_metrics(report))
    writer.close()
    for prompt in report["per_prompt"]:
        print(f"{prompt['prompt']!r}: accuracy {prompt['accuracy']:.2f}, diversity "
              f"{prompt['sample_diversity']:.3f} (real {prompt['real_diversity']:.3f}), "
              f"{prompt['distinct_images']} distinct, {prompt['copied_images']} copies")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in record.items()))
    print(f"report -> {path}")
