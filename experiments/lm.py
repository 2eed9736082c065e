"""GPT-style language modelling with a causal Transformer: train, evaluate, sample.

    # train (built-in corpus: the Python standard library's source code)
    python experiments/lm.py --workdir=/tmp/lm [--config=experiments/configs/lm.py]
        [--config.dataset=lm1b --config.data_dir=DIR] [--config.KEY=VALUE ...]
    # continue prompts with the trained model (KV cache; temperature, top-k, top-p)
    python experiments/lm.py --workdir=/tmp/lm --generate="def fibonacci(n):" \
        [--generate="class Stack:"] [--config.temperature=0.8 --config.top_p=0.95
         --config.top_k=40 --config.num_generate_tokens=96 --config.num_samples=2]

Training evaluates loss, perplexity and next-token accuracy on held-out text
(eval lines in metrics.jsonl) and prints samples at the end. Generation reads
the model from the workdir (config.json, the cached tokenizer, the latest
checkpoint); of --config only the sampling keys apply there. See docs/lm.md.
"""
from __future__ import annotations

import functools
import os
import sys

import grain
import jax
from absl import flags

from tfx_jax import train as tr
from tfx_jax.apps.language_model import (eval_batches, eval_windows, generate_texts, lm_config,
                                         lm_task, load_or_train_lm_tokenizer, load_trained_lm,
                                         make_evaluate, open_corpus, train_batches)
from tfx_jax.data.packing import choose_packing
from tfx_jax.lm import CausalLM

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's own flags (defined when run, so importing the module has no side effects)."""
    flags.DEFINE_multi_string("generate", None, "Prompts to continue with the model in "
                              "--workdir (repeat the flag for several).")


def sampling_kwargs(config) -> dict:
    return dict(num_tokens=config.num_generate_tokens, num_samples=config.num_samples,
                seed=config.sample_seed, temperature=config.temperature,
                top_k=config.top_k or None, top_p=config.top_p if config.top_p < 1 else None)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def print_samples(prompts, samples) -> None:
    if jax.process_index() != 0:
        return
    for prompt, texts in zip(prompts, samples):
        for index, text in enumerate(texts):
            print(f"--- sample {index + 1} of {prompt!r}\n{text}")


def prepare_data(config, workdir: str):
    """(corpus, tokenizer trained or loaded from the workdir, held-out windows)."""
    corpus = open_corpus(config.dataset, data_dir=config.data_dir,
                         train_split=config.train_split, eval_split=config.eval_split,
                         text_key=config.text_key, eval_fraction=config.eval_fraction,
                         max_files=config.max_files)
    tokenizer = load_or_train_lm_tokenizer(corpus.train, workdir, vocab_size=config.vocab_size,
                                           max_chars=config.tokenizer_max_chars,
                                           seed=config.seed, model_type=config.tokenizer_type)
    windows = eval_windows(corpus.eval, tokenizer, max_len=config.max_len,
                           max_examples=config.max_eval_examples)
    return corpus, tokenizer, windows


def train(config, workdir: str, mesh=None) -> tr.TrainResult:
    """Trains into ``workdir``; ``mesh`` defaults to every device of every host."""
    with tr.launch.user_errors():  # no corpus / tokenizer / eval text: one line, exit 2
        corpus, tokenizer, windows = prepare_data(config, workdir)
    model = CausalLM(lm_config(config.model, vocab_size=tokenizer.vocab_size,
                               max_len=config.max_len))
    eval_data = eval_batches(windows, global_batch_size=config.eval_batch_size,
                             max_len=config.max_len)
    task = lm_task(model, max_len=config.max_len,
                   evaluate=make_evaluate(model, eval_data, num_examples=len(windows)))
    make_batches = functools.partial(
        train_batches, corpus.train, tokenizer, global_batch_size=config.batch_size,
        max_len=config.max_len, seed=config.seed,
        num_packing_bins=config.num_packing_bins or None,
        read_options=grain.ReadOptions(num_threads=config.data_threads))
    packing = choose_packing(  # the same examples on every process: all decide alike
        config.packing, lambda packed: make_batches(packing_enabled=packed, process_index=0,
                                                    process_count=1), ("targets",))
    train_iter = make_batches(packing_enabled=packing.enabled)
    _say(f"{corpus.description}; vocabulary {tokenizer.vocab_size}, rows of {config.max_len} "
         f"tokens, {len(windows)} held-out windows; {config.num_train_steps} steps of "
         f"{config.batch_size} rows")
    _say(packing.report(corpus.name))
    result = tr.train(config, workdir, task, train_iter, mesh=mesh)
    if config.sample_prompts:
        print_samples(config.sample_prompts, generate_texts(
            model, result.state.params, tokenizer, list(config.sample_prompts),
            **sampling_kwargs(config)))
    return result


def generate(config, workdir: str, prompts: list[str]) -> None:
    trained = load_trained_lm(workdir)
    print_samples(prompts, generate_texts(trained.model, trained.params, trained.tokenizer,
                                          prompts, **sampling_kwargs(config)))


def main(config, workdir: str) -> None:
    if FLAGS.generate:
        with tr.launch.user_errors():
            generate(config, workdir, FLAGS.generate)
        return
    train(config, workdir)


if __name__ == "__main__":
    define_flags()
    tr.launch.run(main, default_config=os.path.join(os.path.dirname(__file__), "configs",
                                                    "lm.py"))
