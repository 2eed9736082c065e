"""Writes a TSV translation corpus whose lengths spread like sentence lengths.

Lists of 1, 2, ... numbers per line, English words -> German words, mostly
short lines and a few long ones (``tfx_jax/data/number_lists.py``): the data on
which sequence packing pays, unlike the built-in number_words.

    python experiments/make_number_lists_tsv.py --out_dir=/tmp/number_lists
    python experiments/translate.py --workdir=/tmp/number_lists_run \\
        --config.train_data=/tmp/number_lists/train.tsv \\
        --config.eval_data=/tmp/number_lists/eval.tsv
"""
from __future__ import annotations

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tfx_jax.data.number_lists import number_list_pairs  # noqa: E402
from tfx_jax.data.text_pairs import write_tsv_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--train_size", type=int, default=20_000)
    parser.add_argument("--eval_size", type=int, default=500)
    parser.add_argument("--mean_count", type=float, default=3.0)
    parser.add_argument("--max_count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = number_list_pairs(args.train_size + args.eval_size, mean_count=args.mean_count,
                              max_count=args.max_count, seed=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    write_tsv_pairs(os.path.join(args.out_dir, "train.tsv"), pairs[:args.train_size])
    write_tsv_pairs(os.path.join(args.out_dir, "eval.tsv"), pairs[args.train_size:])
    print(f"wrote {args.train_size} train and {args.eval_size} eval pairs to {args.out_dir}")


if __name__ == "__main__":
    main()
