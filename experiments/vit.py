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
the latest checkpoint); --config is ignored there. An action flag given empty
(``--predict=""``) is refused, never taken as "train". The logic lives in
tfx_jax/apps/classification/; see docs/vision.md.
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
from tfx_jax.apps.classification.experiment import draw_attention_maps, predict, train

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's own flags (defined when run, so importing the module has no side effects)."""
    flags.DEFINE_list("predict", None, "Image files to classify with the model in --workdir.")
    flags.DEFINE_list("attention_maps", None,
                      "Image files whose [CLS] attention maps to save under <workdir>/attention/.")
    flags.DEFINE_bool("invert", False, "Invert image files (dark ink on light paper -> the "
                      "digits' bright ink on black).")


def main(config, workdir: str) -> None:
    to_predict = tr.launch.action("predict", "image files")
    to_draw = tr.launch.action("attention_maps", "image files")
    if to_predict is None and to_draw is None:
        train(config, workdir)
    if to_predict is not None:
        predict(workdir, to_predict, FLAGS.invert)
    if to_draw is not None:
        draw_attention_maps(workdir, to_draw, FLAGS.invert)


if __name__ == "__main__":
    define_flags()
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "vit.py"))
