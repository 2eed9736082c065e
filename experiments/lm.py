r"""GPT-style language modelling with a causal Transformer: train, evaluate, sample.

    # train (built-in corpus: the Python standard library's source code)
    python experiments/lm.py --workdir=/tmp/lm [--config=experiments/configs/lm.py]
        [--config.dataset=lm1b --config.data_dir=DIR] [--config.KEY=VALUE ...]
    # fine-tune a Hugging Face decoder (Llama, Mistral, Qwen, Gemma; tokenizer.json) on text
    # files or a JSONL of {"prompt": ..., "response": ...} lines (loss on the responses)
    python experiments/lm.py --workdir=/tmp/lm_ft --config.init_from=HF_DIR \
        --config.dataset=task.jsonl [--config.finetune=lora|full]
    # continue prompts with the trained model (KV cache; temperature, top-k, top-p);
    # @FILE: one prompt per line (\n in a line is a newline), -: the same from stdin
    python experiments/lm.py --workdir=/tmp/lm --generate="def fibonacci(n):" \
        [--generate="class Stack:"] [--generate=@prompts.txt] [--config.temperature=0.8
         --config.top_p=0.95 --config.top_k=40 --config.num_generate_tokens=96
         --config.num_samples=2]

Training evaluates loss, perplexity and next-token accuracy on held-out text
(eval lines in metrics.jsonl) and prints samples at the end. Generation reads
the model from the workdir (config.json, the cached tokenizer, the latest
checkpoint) and continues every prompt in one batch; of --config only the
sampling keys apply there. The logic lives in tfx_jax/apps/language_model/;
see docs/lm.md (fine-tuning: docs/pretrained.md).
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
from tfx_jax.apps.language_model.experiment import generate, read_prompts, train

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's own flags (defined when run, so importing the module has no side effects)."""
    flags.DEFINE_multi_string("generate", None, "Prompts to continue with the model in "
                              "--workdir (repeat the flag; @FILE: one prompt per line of FILE; "
                              "'-': one per line of stdin).")


def main(config, workdir: str) -> None:
    specs = tr.launch.action("generate", "prompts")
    if specs is None:
        train(config, workdir)
    else:
        generate(config, workdir, read_prompts(specs))


if __name__ == "__main__":
    define_flags()
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "lm.py"))
