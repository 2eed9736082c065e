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
the command line. ``--generate=""`` is refused, never taken as "train". The
logic lives in tfx_jax/apps/dalle/experiment.py; see docs/vision.md.
"""
from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C during the slow imports below: one line, exit 130
    signal.signal(signal.SIGINT, lambda *_: (print("Stopped: interrupted (SIGINT) while "
                                                   "starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))

from absl import flags

from tfx_jax import train as tr
from tfx_jax.apps.dalle.experiment import evaluate, generate, train

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's own flags (defined when run, so importing the module has no side effects)."""
    flags.DEFINE_list("generate", None, "Prompts (comma-separated) to draw with the generator in "
                      "--workdir, one grid row each.")
    flags.DEFINE_string("output", None, "PNG path for --generate (default: "
                        "<workdir>/generated/<first prompt>.png).")
    flags.DEFINE_bool("evaluate", False, "Score the generator in --workdir with the classifier in "
                      "--config.classifier_workdir.")


def main(config, workdir: str) -> None:
    texts = tr.launch.action("generate", "prompts")
    if texts is None and not FLAGS.evaluate:
        train(config, workdir)
    if texts is not None:
        generate(config, workdir, texts, FLAGS.output)
    if FLAGS.evaluate:
        evaluate(config, workdir)


if __name__ == "__main__":
    define_flags()
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "dalle.py"))
