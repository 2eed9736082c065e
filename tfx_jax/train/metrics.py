"""Metrics output: ``<workdir>/metrics.jsonl`` and TensorBoard, written by process 0 only.

Each line of ``metrics.jsonl`` is one JSON object, e.g.
``{"step": 100, "split": "train", "loss": 2.31, "learning_rate": 0.0007,
"steps_per_sec": 5.2, "grad_norm": 0.9}``; evaluation lines carry
``"split": "eval"`` and the evaluation's metrics (``loss``, ``accuracy``,
``bleu``, ``exact_match``, ...). TensorBoard scalars are ``<split>/<name>``
under ``<workdir>/tensorboard``.

On resume from a checkpoint at step ``s`` the writer first drops lines with
``step > s`` (written after that checkpoint by the interrupted run, and about
to be written again) and TensorBoard purges the same steps, so the files read
like one uninterrupted run.

A workdir may be a URL such as ``gs://bucket/run`` (shared by all hosts of a
multi-host run); files are then reached through ``etils.epath`` (needs gcsfs
for GCS). Object stores cannot append, so there the file is rewritten whole
at each write (one small write per log line).

Also in this module: What a person watching the run sees: a tqdm bar while training, a summary table at the end.

Also in this module: TensorBoard event files on object stores, written through ``etils.epath``.

Also in this module: A benchmark's results as two files: ``<name>.json`` (its settings and every record) and
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from tfx_jax.train.state import WEIGHT_KEY

# --- metrics ----------------------------------------------------------------------------
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_python(value: Any) -> Any:
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    return value


def average_metrics(per_batch: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means of each metric over batches, weighted by the ``"weight"`` metric when present.

    ``weight`` itself is summed (e.g. the number of real tokens seen).
    """
    if not per_batch:
        return {}
    weights = np.asarray([float(m.get(WEIGHT_KEY, 1.0)) for m in per_batch], np.float64)
    total = weights.sum()
    out = {}
    for name in per_batch[0]:
        if name == WEIGHT_KEY:
            out[name] = float(total)
            continue
        values = np.asarray([float(m[name]) for m in per_batch], np.float64)
        out[name] = float((values * weights).sum() / total) if total > 0 else float("nan")
    return out


def is_url(path: str) -> bool:
    """True for ``gs://...`` and other object-store paths (no local directories, no append)."""
    return "://" in os.fspath(path)


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl`` (optionally of one split), in file order."""
    path = epath.Path(workdir) / METRICS_FILE
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if split is None or record.get("split") == split:
                records.append(record)
    return records


def _lines_up_to(path: epath.Path, step: int) -> list[str]:
    """The lines of ``path`` with records of steps up to ``step`` (a torn last line is dropped)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the previous run was killed
        if record.get("step", 0) <= step:
            kept.append(json.dumps(record) + "\n")
    return kept


class MetricsWriter:
    """Appends metric records to metrics.jsonl and TensorBoard (no-op off process 0)."""

    def __init__(self, workdir: str, *, start_step: int = 0, tensorboard: bool = True,
                 enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = None
        self._lines = None  # all lines, for object stores (rewritten at each write)
        self._tensorboard = None
        if not self.enabled:
            return
        path = epath.Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = _lines_up_to(path, start_step)
        if is_url(workdir):
            self._lines = lines
            path.write_text("".join(lines))
        else:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(lines)
            os.replace(tmp, self.path)
            self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
            if is_url(workdir):
                route_through_epath(workdir)
            self._tensorboard = SummaryWriter(
                os.path.join(workdir, TENSORBOARD_DIR),
                purge_step=start_step + 1 if start_step > 0 else None)

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict:
        """Writes ``{"step": step, "split": split, **metrics}``; returns the record."""
        record = {"step": int(step), "split": split}
        record.update({name: _to_python(value) for name, value in metrics.items()})
        if self._lines is not None:
            self._lines.append(json.dumps(record) + "\n")
            epath.Path(self.path).write_text("".join(self._lines))
        elif self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tensorboard is not None:
            for name, value in record.items():
                if name not in ("step", "split") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


# --- progress ---------------------------------------------------------------------------
# What a person watching the run sees: a tqdm bar while training, a summary table at the end.
#
# The bar shows the latest logged loss and the step rate; it is shown only on
# process 0 and only when stderr is a terminal (so log files stay clean).

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


# --- event files ------------------------------------------------------------------------
# TensorBoard event files on object stores, written through ``etils.epath``.
#
# tensorboardX writes event files with ``open`` for local paths and with its own
# clients for ``gs://`` (google-cloud-storage) and ``s3://`` (boto3). A run's
# workdir reaches every other file through ``etils.epath``, so the event files
# do too: :func:`route_through_epath` registers a tensorboardX writer for the
# workdir's scheme that keeps the file's bytes and rewrites the object at each
# flush (an object store cannot append), as tensorboardX's own GCS writer does.

class _EpathEventFile:
    """A tensorboardX record writer whose flush rewrites the whole file through epath."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """A tensorboardX writer factory (``open`` and ``directory_check``) on epath."""

    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def route_through_epath(url: str) -> None:
    """Makes tensorboardX write files under ``url``'s scheme (``gs``, ``s3``, ...) via epath."""
    scheme = url.split("://", 1)[0]
    from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
    record_writer.register_writer_factory(scheme, _EpathEventFiles())


# --- results files ----------------------------------------------------------------------
# A benchmark's results as two files: ``<name>.json`` (its settings and every record) and
# ``<name>.csv`` (one row per record, for spreadsheets and plots).

def write_results(out_dir: str, name: str, meta: dict, records: list[dict],
                  csv_columns: dict | None = None) -> list[str]:
    """Writes ``{"meta": meta, "records": records}`` as JSON and the records as CSV.

    ``csv_columns``: values repeated on every CSV row (the date, the device, ...),
    since the CSV has no room for ``meta``. Returns the two paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "csv"))
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=2)
        f.write("\n")
    extra = dict(csv_columns or {})
    columns = list(dict.fromkeys(key for record in records for key in record))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, *extra])
        writer.writeheader()
        for record in records:
            writer.writerow({**record, **extra})
    return [json_path, csv_path]
