"""DALL-E-style text-to-image generation of digits: train, generate, evaluate.

    # train the decoder-only LM on [prompt ; image tokens] (teacher forcing)
    python experiments/dalle.py --workdir=/tmp/dalle [--config=experiments/configs/dalle.py]
        [--config.classifier_workdir=/tmp/vit]   # + generation scores at each evaluation
    # a PNG grid of samples for prompts (comma-separated), deterministic given the seed
    python experiments/dalle.py --workdir=/tmp/dalle --generate="a handwritten seven,the digit 3"
        [--config.samples_per_prompt=8 --config.temperature=0.8 --config.top_k=4
         --config.sample_seed=1] [--output=grid.png]
    # score the trained generator with a trained ViT classifier; writes
    # <workdir>/generation_eval.json and an eval line in metrics.jsonl
    python experiments/dalle.py --workdir=/tmp/dalle --evaluate --config.classifier_workdir=/tmp/vit

Generation and evaluation read the model and tokenizer from the workdir
(config.json, patch_vq.npz, the latest checkpoint) and the sampling keys
(samples_per_prompt, temperature, top_k, sample_seed, classifier_workdir) from
the command line. See docs/vision.md.
"""
from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C during the slow imports below: one line, exit 130
    signal.signal(signal.SIGINT, lambda *_: (print("Stopped: interrupted (SIGINT) while "
                                                   "starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))

import re

from absl import flags
from etils import epath

from tfx_jax import train as tr
from tfx_jax.apps.classification import load_classifier
from tfx_jax.apps.dalle import DigitPrompts, JointLayout
from tfx_jax.apps.dalle.evaluate import (dataset_arrays, evaluate_generator, generation_evaluate_fn,
                                    scalar_metrics, write_report)
from tfx_jax.apps.dalle.generate import generate_images, save_image_grid
from tfx_jax.apps.dalle.input_pipeline import eval_generator_batches, train_generator_batches
from tfx_jax.apps.dalle.task import (generator_config, generator_task, image_tokenizer_from_config,
                                load_generator)
from tfx_jax.data.image_datasets import load_image_dataset
from tfx_jax.lm import CausalLM

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's own flags (defined when run, so importing the module has no side effects)."""
    flags.DEFINE_list("generate", None, "Prompts (comma-separated) to draw with the generator in "
                      "--workdir, one grid row each.")
    flags.DEFINE_string("output", None, "PNG path for --generate (default: "
                        "<workdir>/generated/<first prompt>.png).")
    flags.DEFINE_bool("evaluate", False, "Score the generator in --workdir with the classifier in "
                      "--config.classifier_workdir.")


def sampling_kwargs(config) -> dict:
    return dict(num_samples=config.samples_per_prompt, seed=config.sample_seed,
                temperature=config.temperature, top_k=config.top_k or None)


def evaluation_data(config) -> dict:
    """The arrays the generation scores compare with (training and test images)."""
    data = dict(data_dir=config.data_dir)
    train_images, _ = dataset_arrays(load_image_dataset(config.dataset, config.train_split,
                                                        **data))
    test_images, test_labels = dataset_arrays(load_image_dataset(config.dataset,
                                                                 config.eval_split, **data))
    return dict(train_images=train_images, test_images=test_images, test_labels=test_labels)


def train(config, workdir: str, mesh=None) -> tr.TrainResult:
    """Trains into ``workdir``; ``mesh`` defaults to every device of every host."""
    data = dict(data_dir=config.data_dir)
    train_data = load_image_dataset(config.dataset, config.train_split, **data)
    eval_data = load_image_dataset(config.dataset, config.eval_split, **data)
    config.image_shape = tuple(train_data.image_shape)
    train_images, _ = dataset_arrays(train_data)
    image_tokenizer = image_tokenizer_from_config(config, workdir, train_images)
    prompts = DigitPrompts()
    layout = JointLayout.for_tokenizers(prompts, image_tokenizer)
    model_config = generator_config(config, layout)
    evaluate = None
    if config.classifier_workdir:
        evaluate = generation_evaluate_fn(
            CausalLM(model_config), prompts, image_tokenizer,
            load_classifier(config.classifier_workdir), workdir=workdir,
            **evaluation_data(config), **sampling_kwargs(config))
    task = generator_task(model_config, layout=layout, evaluate=evaluate)
    tokens = dict(prompts=prompts, image_tokenizer=image_tokenizer,
                  global_batch_size=config.batch_size, text_loss_weight=config.text_loss_weight)
    train_iter = train_generator_batches(train_data, seed=config.seed, **tokens)
    eval_batches = lambda: eval_generator_batches(eval_data, **tokens)  # noqa: E731
    print(f"{config.dataset}: {len(train_data)} train images as {layout.image_length} "
          f"{config.image_tokenizer} tokens ({layout.image_vocab_size} codes); sequences of "
          f"{layout.sequence_length} tokens, vocabulary {layout.vocab_size}", file=sys.stderr)
    return tr.train(config, workdir, task, train_iter, eval_batches=eval_batches, mesh=mesh)


def generate(config, workdir: str, texts: list[str], output: str | None) -> None:
    generator = load_generator(workdir)
    images = generate_images(generator.model, generator.params, generator.prompts,
                             generator.image_tokenizer, texts, **sampling_kwargs(config))
    if output is None:
        slug = re.sub(r"[^a-z0-9]+", "_", texts[0].lower()).strip("_")
        output = os.fspath(epath.Path(workdir) / "generated" / f"{slug}.png")
    save_image_grid(output, images, texts)
    print(f"{len(texts)} prompt(s) x {images.shape[1]} samples -> {output}")


def evaluate(config, workdir: str) -> None:
    if not config.classifier_workdir:
        raise ValueError("--evaluate needs --config.classifier_workdir: the workdir of a "
                         "trained ViT digit classifier (experiments/vit.py)")
    generator = load_generator(workdir)
    classifier = load_classifier(config.classifier_workdir)
    trained = tr.load_config(workdir)
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


def main(config, workdir: str) -> None:
    if FLAGS.generate or FLAGS.evaluate:
        with tr.launch.user_errors():
            if FLAGS.generate:
                generate(config, workdir, FLAGS.generate, FLAGS.output)
            if FLAGS.evaluate:
                evaluate(config, workdir)
        return
    train(config, workdir)


if __name__ == "__main__":
    define_flags()
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "dalle.py"))
