"""Vision Transformer image classification: train, classify image files, draw attention.

    # train (built-in digits by default; any TFDS image dataset with --config.dataset)
    python experiments/vit.py --workdir=/tmp/vit [--config=experiments/configs/vit.py]
        [--config.dataset=mnist --config.data_dir=DIR] [--config.KEY=VALUE ...]
    # fine-tune released weights (.npz or Hugging Face directory) with a new head;
    # --config.finetune=full|frozen|lora (docs/pretrained.md)
    python experiments/vit.py --workdir=/tmp/ft --config.init_from=ViT-B_16.npz \
        --config.finetune=lora --config.lora_rank=8
    # classify PNG/JPEG files with the trained model (dark ink on white: --invert)
    python experiments/vit.py --workdir=/tmp/vit --predict=a.png,b.png [--invert]
    # [CLS]-to-patch attention per layer and head, one PNG per file in <workdir>/attention/
    python experiments/vit.py --workdir=/tmp/vit --attention_maps=a.png [--invert]

Prediction and attention maps read the model from the workdir (config.json and
the latest checkpoint); --config is ignored there. See docs/vision.md.
"""
from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C during the slow imports below: one line, exit 130
    signal.signal(signal.SIGINT, lambda *_: (print("Stopped: interrupted (SIGINT) while "
                                                   "starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))

import math

from absl import flags
from etils import epath

from tfx_jax import train as tr
from tfx_jax.apps.attention_maps import cls_attention_maps, save_attention_maps
from tfx_jax.apps.classification import (classification_task, format_predictions, load_classifier,
                                         setup_finetuning, vit_config)
from tfx_jax.data.image_datasets import load_image_dataset
from tfx_jax.data.image_files import load_image_files
from tfx_jax.data.image_pipeline import (eval_image_batches, image_input_shape,
                                         train_image_batches)
from tfx_jax.data.image_preprocess import denormalize_images
from tfx_jax.train.finetune import parameter_counts

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's own flags (defined when run, so importing the module has no side effects)."""
    flags.DEFINE_list("predict", None, "Image files to classify with the model in --workdir.")
    flags.DEFINE_list("attention_maps", None,
                      "Image files whose [CLS] attention maps to save under <workdir>/attention/.")
    flags.DEFINE_bool("invert", False, "Invert image files (dark ink on light paper -> the "
                      "digits' bright ink on black).")


def resolve_data_keys(config, train_data) -> None:
    """Fills the keys the dataset decides (input shape, classes) and epoch-based steps."""
    config.image_shape = image_input_shape(train_data, config.image_size)
    config.num_classes = train_data.num_classes
    config.class_names = tuple(train_data.class_names)
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    if config.num_epochs > 0:
        steps = math.ceil(config.num_epochs * steps_per_epoch / config.grad_accum_steps)
        config.num_train_steps = steps * config.grad_accum_steps
    if config.eval_every_epochs > 0:
        config.eval_every_steps = config.eval_every_epochs * steps_per_epoch


def train(config, workdir: str, mesh=None) -> tr.TrainResult:
    """Trains into ``workdir``; ``mesh`` defaults to every device of every host."""
    data = dict(data_dir=config.data_dir)
    train_data = load_image_dataset(config.dataset, config.train_split, **data)
    eval_data = load_image_dataset(config.dataset, config.eval_split, **data)
    finetuning, params = setup_finetuning(config, train_data.num_classes,
                                          train_data.image_shape[-1])
    resolve_data_keys(config, train_data)
    task = classification_task(vit_config(config), label_smoothing=config.label_smoothing,
                               finetuning=finetuning, pretrained_params=params)
    trained, total = parameter_counts(task)
    print(f"parameters: {trained:,} trainable of {total:,}"
          + (f" (from {config.init_from}, finetune={config.finetune})" if finetuning else ""),
          file=sys.stderr)
    train_iter = train_image_batches(train_data, global_batch_size=config.batch_size,
                                     seed=config.seed, image_size=config.image_size,
                                     augment=config.augment, max_shift=config.max_shift)
    eval_batches = lambda: eval_image_batches(  # noqa: E731 (a fresh pass per evaluation)
        eval_data, global_batch_size=config.batch_size, image_size=config.image_size)
    print(f"{config.dataset}: {len(train_data)} train / {len(eval_data)} {config.eval_split} "
          f"images {tuple(config.image_shape)}, {config.num_classes} classes; "
          f"{config.num_train_steps} steps, evaluation every {config.eval_every_steps}",
          file=sys.stderr)
    return tr.train(config, workdir, task, train_iter, eval_batches=eval_batches, mesh=mesh)


def predict(workdir: str, paths: list[str], invert: bool) -> None:
    classifier = load_classifier(workdir)
    labels, probs = classifier.predict(load_image_files(paths, classifier.image_shape,
                                                        invert=invert))
    print("\n".join(format_predictions(paths, labels, probs, classifier.class_names)))


def draw_attention_maps(workdir: str, paths: list[str], invert: bool) -> None:
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


def main(config, workdir: str) -> None:
    if FLAGS.predict or FLAGS.attention_maps:
        with tr.launch.user_errors():
            if FLAGS.predict:
                predict(workdir, FLAGS.predict, FLAGS.invert)
            if FLAGS.attention_maps:
                draw_attention_maps(workdir, FLAGS.attention_maps, FLAGS.invert)
        return
    train(config, workdir)


if __name__ == "__main__":
    define_flags()
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "vit.py"))
