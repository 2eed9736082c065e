"""Writes a real translation corpus from the gettext catalogs installed on this machine.

Programs ship their user interface translations as compiled gettext catalogs
(``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``): each maps an English message
(msgid) to its translation (msgstr), written by people. Read together they are
a parallel corpus of short, real sentences and phrases (menu entries, error
messages, help lines), offline:

    python experiments/make_gettext_tsv.py --out_dir=/tmp/gettext   # en -> de
    python experiments/translate.py --workdir=/tmp/gettext_run \\
        --config.train_data=/tmp/gettext/train.tsv --config.eval_data=/tmp/gettext/eval.tsv \\
        --config.test_data=/tmp/gettext/test.tsv

How many pairs there are depends on the packages installed: the script prints
the count and the number of catalogs it read (42,340 distinct pairs from 85
catalogs on the machine docs/translate.md was measured on, about 72,000 entries
before removing duplicates; another machine gives other numbers). A catalog is
read with Python's :mod:`gettext`; for a plural message only its singular form
is kept (msgid with msgstr[0]); whitespace runs
(line breaks, tabs) become one space; the header entry, empty or untranslated
(identical) messages and messages without a letter are left out, and a msgid
seen in several catalogs keeps its first translation (catalogs in name order).
The pairs are shuffled with ``--seed`` and split into disjoint test, eval and
train files (a source sentence is in one file only).
"""
from __future__ import annotations

import argparse
import gettext
import glob
import os
import sys

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tfx_jax.data.text_pairs import write_tsv_pairs  # noqa: E402


def catalog_paths(language: str, root: str = "/usr/share") -> list[str]:
    """The installed ``.mo`` catalogs of ``language``, in name order."""
    patterns = (f"{root}/locale/{language}/LC_MESSAGES/*.mo",
                f"{root}/*/lang/{language}/LC_MESSAGES/*.mo", f"{root}/*/lang/{language}.mo")
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


def _clean(text: str) -> str:
    return " ".join(text.split())


def catalog_pairs(path: str) -> list[tuple[str, str]]:
    """(English, translation) pairs of one catalog (see the module docstring)."""
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog  # pylint: disable=protected-access
    pairs = []
    for key, translation in catalog.items():
        if isinstance(key, tuple):  # (msgid, plural form index)
            if key[1] != 0:
                continue
            key = key[0]
        source, target = _clean(key), _clean(translation)
        if (source and target and source != target and any(c.isalpha() for c in source)):
            pairs.append((source, target))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--language", default="de", help="the catalogs' language (target side)")
    parser.add_argument("--eval_size", type=int, default=500)
    parser.add_argument("--test_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = catalog_paths(args.language)
    if not paths:
        sys.exit(f"error: no gettext catalogs for language {args.language!r} under /usr/share")
    pairs: dict[str, str] = {}
    read, unreadable = 0, []
    for path in paths:
        try:
            found = catalog_pairs(path)
        except (OSError, UnicodeDecodeError, ValueError) as e:  # e.g. a wrong charset header
            unreadable.append(f"{os.path.basename(path)} ({type(e).__name__})")
            continue
        read += 1
        for source, target in found:
            pairs.setdefault(source, target)
    rows = list(pairs.items())
    held_out = args.eval_size + args.test_size
    if len(rows) < held_out + args.eval_size:
        sys.exit(f"error: only {len(rows)} pairs in {read} catalogs; too few for "
                 f"--eval_size={args.eval_size} and --test_size={args.test_size}")
    order = np.random.default_rng(args.seed).permutation(len(rows))
    rows = [rows[i] for i in order]
    os.makedirs(args.out_dir, exist_ok=True)
    splits = {"test": rows[:args.test_size], "eval": rows[args.test_size:held_out],
              "train": rows[held_out:]}
    for name, split in splits.items():
        write_tsv_pairs(os.path.join(args.out_dir, f"{name}.tsv"), split)
    print(f"en -> {args.language}: {len(rows)} distinct pairs from {read} of {len(paths)} "
          f"catalogs (this machine's installed packages; other machines differ): "
          f"{len(splits['train'])} train / {len(splits['eval'])} eval / "
          f"{len(splits['test'])} test pairs in {args.out_dir}")
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable catalogs: {', '.join(unreadable)}")


if __name__ == "__main__":
    main()
