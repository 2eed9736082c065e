"""A benchmark's results as two files: ``<name>.json`` (its settings and every record) and
``<name>.csv`` (one row per record, for spreadsheets and plots)."""
from __future__ import annotations

import csv
import json
import os


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
