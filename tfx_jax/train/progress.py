"""What a person watching the run sees: a tqdm bar while training, a summary table at the end.

The bar shows the latest logged loss and the step rate; it is shown only on
process 0 and only when stderr is a terminal (so log files stay clean).
"""
from __future__ import annotations

import sys
from typing import Mapping, Optional

import jax
from tqdm import tqdm


def make_progress_bar(total_steps: int, start_step: int, *, enabled: bool = True) -> tqdm:
    show = enabled and jax.process_index() == 0 and sys.stderr.isatty()
    return tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                dynamic_ncols=True, disable=not show)


def format_summary(title: str, rows: Mapping[str, Mapping[str, object]]) -> str:
    """A plain-text table: one row per split, one column per metric name."""
    columns = []
    for metrics in rows.values():
        columns += [name for name in metrics if name not in columns]

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "-" if value is None else str(value)

    table = [["split"] + columns]
    table += [[split] + [cell(metrics.get(name)) for name in columns]
              for split, metrics in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in table]
    rule = "-" * len(lines[0])
    return "\n".join([title, rule, lines[0], rule, *lines[1:], rule])


def print_summary(title: str, rows: Mapping[str, Mapping[str, object]],
                  file: Optional[object] = None) -> None:
    """Prints :func:`format_summary` on process 0."""
    if jax.process_index() == 0:
        print(format_summary(title, rows), file=file or sys.stdout, flush=True)
