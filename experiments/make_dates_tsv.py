"""Writes a small TSV transduction task: ISO dates -> English dates, e.g.

    2024-03-05	the 5th of March 2024
    1987-11-22	the 22nd of November 1987

The model must reverse the order of the fields (year-month-day -> day, month,
year), turn month numbers into names, drop the day's leading zero and choose
the ordinal suffix (1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ...). Dates are
drawn without repetition from 1900-01-01 .. 2099-12-31 and the files are
disjoint, so evaluation is on unseen dates.

    python experiments/make_dates_tsv.py --out_dir=/tmp/dates
    python experiments/translate.py --workdir=/tmp/dates_run \\
        --config.train_data=/tmp/dates/train.tsv --config.eval_data=/tmp/dates/eval.tsv
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tfx_jax.data.text_pairs import write_tsv_pairs  # noqa: E402

FIRST_DAY = datetime.date(1900, 1, 1)
NUM_DAYS = (datetime.date(2099, 12, 31) - FIRST_DAY).days + 1


def ordinal(day: int) -> str:
    """1 -> "1st", 2 -> "2nd", 11 -> "11th", 23 -> "23rd"."""
    if 11 <= day <= 13:
        return f"{day}th"
    return f"{day}" + {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def date_pair(date: datetime.date) -> tuple[str, str]:
    return date.isoformat(), f"the {ordinal(date.day)} of {date:%B} {date.year}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--eval_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    offsets = np.random.default_rng(args.seed).choice(
        NUM_DAYS, size=args.train_size + args.eval_size, replace=False)
    dates = [FIRST_DAY + datetime.timedelta(days=int(d)) for d in offsets]
    os.makedirs(args.out_dir, exist_ok=True)
    pairs = [date_pair(date) for date in dates]
    write_tsv_pairs(os.path.join(args.out_dir, "train.tsv"), pairs[:args.train_size])
    write_tsv_pairs(os.path.join(args.out_dir, "eval.tsv"), pairs[args.train_size:])
    print(f"wrote {args.train_size} train and {args.eval_size} eval pairs to {args.out_dir}")


if __name__ == "__main__":
    main()
