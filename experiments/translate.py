"""Sequence transduction with the encoder-decoder Transformer: train, evaluate, translate.

    # train (built-in number_words, English -> German number words, by default)
    python experiments/translate.py --workdir=/tmp/translate [--config=experiments/configs/translate.py]
        [--config.train_data=train.tsv [--config.eval_data=eval.tsv]]
        [--config.dataset=wmt14_translate/de-en --config.data_dir=DIR] [--config.KEY=VALUE ...]
    # translate with the trained model (beam search); "-" reads one sentence per stdin line
    python experiments/translate.py --workdir=/tmp/translate --translate="twenty one" \
        --translate="three hundred five"

Training greedy-decodes the eval split at every evaluation (exact_match, bleu in
metrics.jsonl), then beam-decodes the test split, prints example translations
and a summary table. Translation reads the model from the workdir (config.json,
the cached tokenizer and the latest checkpoint's parameters) and prints one line
per input line; of --config only the decoding keys (beam_size, alpha) apply
there. The logic lives in tfx_jax/apps/translation/; see docs/translate.md.
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
from tfx_jax.apps.translation.experiment import (expand_stdin, load_translator,
                                                 train_and_test, translate_lines)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's own flags (defined when run, so importing the module has no side effects)."""
    flags.DEFINE_multi_string("translate", None, "Sentences to translate with the model in "
                              "--workdir (repeat the flag; '-' reads lines from stdin).")


def translate(config, workdir: str, sentences: list[str]) -> None:
    lines = expand_stdin(sentences, sys.stdin)
    translator = load_translator(workdir)
    for line in translate_lines(translator, lines, beam_size=config.beam_size,
                                alpha=config.alpha):
        print(line)


def main(config, workdir: str) -> None:
    sentences = tr.launch.action("translate", "sentences")
    if sentences is None:
        train_and_test(config, workdir)
    else:
        translate(config, workdir, sentences)


if __name__ == "__main__":
    define_flags()
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "translate.py"))
