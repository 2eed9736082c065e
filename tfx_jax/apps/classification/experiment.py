"""The ViT classification experiment: check, resolve, train; and classify with a trained workdir.

:func:`train` is what ``experiments/vit.py`` runs, in the order of the other
apps: :func:`check` (the config alone: training keys, the model section, the
heads and widths against the mesh), the workdir (another script's is
refused), the datasets, :func:`resolve` (what the data and a pre-trained
checkpoint decide: image shape, classes, steps of ``num_epochs``, the
evaluation interval of ``eval_every_epochs``, architecture fields of
``init_from``) into a frozen plan, one Task, then
:func:`tfx_jax.train.train`. The user's config is never changed.

:func:`predict` and :func:`draw_attention_maps` read the model from the
workdir (config.json and the latest checkpoint).
"""
from __future__ import annotations

import dataclasses
import math

from etils import epath

from tfx_jax import train as tr
from tfx_jax.apps.attention_maps import cls_attention_maps, save_attention_maps
from tfx_jax.apps.classification.task import (JOB, classification_task, format_predictions,
                                              load_classifier, load_splits, setup_finetuning,
                                              vit_config)
from tfx_jax.data.image_preprocess import load_image_files
from tfx_jax.data.image_pipeline import (eval_image_batches, image_input_shape,
                                         train_image_batches)
from tfx_jax.data.image_preprocess import denormalize_images
from tfx_jax.errors import require, say
from tfx_jax.train.checkpoint import workdir_lock
from tfx_jax.train.finetune import parameter_counts


def _probe(config):
    """The config with stand-ins for what the data decides (for checks before reading it)."""
    probe = config.copy_and_resolve_references()
    patch = probe.model.get("patch_size") or 16
    with probe.unlocked():
        probe.image_shape = (probe.get("image_size") or patch,) * 2 + (1,)
        probe.num_classes = probe.get("num_classes") or 2
    return probe


def check(config, mesh) -> None:
    """One ConfigError naming the first bad key; reads no data, writes nothing."""
    probe = _probe(config)
    if config.num_epochs > 0:  # the steps come from the data; check the other keys now
        probe.num_train_steps = config.grad_accum_steps * (config.warmup_steps + 1)
    tr.validate_config(probe)
    tr.check_batch_size(config.batch_size, mesh)
    if not config.get("init_from"):  # a checkpoint decides the architecture otherwise
        tr.check_params_fit_mesh(classification_task(vit_config(probe)).init_params, mesh)


def resolve(config, train_data, decided=None):
    """The run's plan: the keys the dataset decides (input shape, classes) and epoch-based
    steps and evaluation interval, with ``decided`` (a checkpoint's), in a frozen copy."""
    decided = dict(decided or {})
    image_size = decided.get("image_size", config.get("image_size"))
    decided.update(image_shape=tuple(image_input_shape(train_data, image_size)),
                   num_classes=train_data.num_classes,
                   class_names=tuple(train_data.class_names))
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    if config.num_epochs > 0:
        updates = math.ceil(config.num_epochs * steps_per_epoch / config.grad_accum_steps)
        decided["num_train_steps"] = updates * config.grad_accum_steps
    if config.eval_every_epochs > 0:
        decided["eval_every_steps"] = config.eval_every_epochs * steps_per_epoch
    return tr.freeze(config, JOB, **decided)


def train(config, workdir: str, mesh=None) -> tr.TrainResult:
    """Trains into ``workdir``; ``mesh`` defaults to ``config.mesh`` over every device."""
    mesh = tr.make_mesh(config.mesh) if mesh is None else mesh
    check(config, mesh)
    if tr.compile_target() is not None:  # --compile_topology: the config alone, no data
        compile_only(config, workdir, mesh)
    tr.check_workdir(workdir, JOB)
    with workdir_lock(workdir):  # one run per workdir, before reading data
        return _train(config, workdir, mesh, *load_splits(config))


def _train(config, workdir: str, mesh, train_data, eval_data) -> tr.TrainResult:
    finetuning, params, decided = setup_finetuning(config, train_data.num_classes,
                                                   train_data.image_shape[-1])
    plan = resolve(config, train_data, decided)
    task = classification_task(vit_config(plan), label_smoothing=plan.label_smoothing,
                               finetuning=finetuning, pretrained_params=params)
    trained, total = parameter_counts(task)
    say(f"parameters: {trained:,} trainable of {total:,}"
        + (f" (from {plan.init_from}, finetune={plan.finetune})" if finetuning else ""))
    train_iter = train_image_batches(train_data, global_batch_size=plan.batch_size,
                                     seed=plan.seed, image_size=plan.image_size,
                                     augment=plan.augment, max_shift=plan.max_shift)
    eval_batches = lambda: eval_image_batches(  # noqa: E731 (a fresh pass per evaluation)
        eval_data, global_batch_size=plan.batch_size, image_size=plan.image_size)
    say(f"{plan.dataset}: {len(train_data)} train / {len(eval_data)} {plan.eval_split} "
        f"images {tuple(plan.image_shape)}, {plan.num_classes} classes; "
        f"{plan.num_train_steps} steps, evaluation every {plan.eval_every_steps}")
    return tr.train(plan, workdir, task, train_iter, eval_batches=eval_batches, mesh=mesh)


def compile_only(config, workdir: str, mesh) -> None:
    """``--compile_topology``: compiles the train and eval steps this run would compile on
    the target, from the config alone (:func:`tfx_jax.train.topology.compile_plan`): no
    dataset is read, nothing but the report is written. The images are
    ``config.image_shape`` or ``image_size`` x ``image_size`` x 3 and the classes
    ``num_classes``, which must then be set (with ``init_from``: the checkpoint's
    architecture and resolution, its weights read)."""
    require(config.get("num_classes") and (config.get("image_shape") or config.get("image_size")
                                           or config.get("init_from")),
            "--compile_topology reads no dataset, so the images and classes cannot come from "
            "it: set config.num_classes and config.image_size (RGB) or config.image_shape "
            "(height, width, channels)")
    channels = config.image_shape[-1] if config.get("image_shape") else 3
    finetuning, params, decided = setup_finetuning(config, config.num_classes, channels)
    size = decided.get("image_size", config.get("image_size"))
    shape = tuple(config.image_shape) if config.get("image_shape") and not size else (
        size, size, channels)
    steps = config.num_train_steps if config.num_epochs <= 0 else (
        config.grad_accum_steps * (config.warmup_steps + 1))  # the steps shape no program
    plan = tr.freeze(config, JOB, **decided, image_shape=shape, num_train_steps=steps)
    def task_with(model):
        return classification_task(model, label_smoothing=plan.label_smoothing,
                                   finetuning=finetuning, pretrained_params=params)

    model = vit_config(plan)
    task = task_with(model)
    features = {"image": (shape, "float32"), "label": ((), "int32")}
    say(f"compiling for {tr.compile_target().name}: images {shape}, {plan.num_classes} "
        f"classes, batches of {plan.batch_size}; no dataset is read")
    tr.compile_plan(plan, workdir, task, mesh, tr.abstract_batch(plan.batch_size, features),
                    tr.abstract_batch(plan.batch_size, features), with_remat=lambda policy: (
                        task_with(dataclasses.replace(model, remat_policy=policy))))


def predict(workdir: str, paths: list[str], invert: bool) -> None:
    """One line per image file: its class and probability (stdout)."""
    classifier = load_classifier(workdir)
    labels, probs = classifier.predict(load_image_files(paths, classifier.image_shape,
                                                        invert=invert))
    print("\n".join(format_predictions(paths, labels, probs, classifier.class_names)))


def draw_attention_maps(workdir: str, paths: list[str], invert: bool) -> None:
    """[CLS]-to-patch attention per layer and head, one PNG per file in <workdir>/attention/."""
    classifier = load_classifier(workdir)
    images = load_image_files(paths, classifier.image_shape, invert=invert)
    labels, probs = classifier.predict(images)
    titles = format_predictions([epath.Path(p).name for p in paths], labels, probs,
                                classifier.class_names)
    maps = cls_attention_maps(classifier.model, classifier.params, images)
    out_dir = epath.Path(workdir) / "attention"
    for path, image, image_maps, title in zip(paths, images, maps, titles):
        out = out_dir / f"{epath.Path(path).stem}.png"
        panels = save_attention_maps(out, denormalize_images(image), image_maps, title=title)
        layers, heads = image_maps.shape[:2]
        print(f"{title} -> {out} ({panels} panels: the input, {layers} layer(s) x {heads} head(s))")
