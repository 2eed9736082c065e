"""A user's parallel corpus as a TSV file: ``source<TAB>target`` per line.

The file is UTF-8, one sentence pair per line, exactly one tab per line and
non-empty text on both sides. Line endings ``\\n`` and ``\\r\\n`` are accepted;
text is otherwise kept as written. The whole file is checked when it is
opened, so a bad line fails at start-up with its file and line number rather
than hours into training.
"""

from __future__ import annotations

import collections.abc
import os

from etils import epath


class TsvPairs(collections.abc.Sequence):
    """Random-access ``(source_text, target_text)`` pairs read from a TSV file.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: a line is not valid UTF-8, has no tab or more than one, or
        has an empty side; the message names the file and the 1-based line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        file = epath.Path(self.path)  # a local path or a gs:// URL
        if not file.is_file():
            raise FileNotFoundError(f"TSV parallel corpus not found: {self.path}")
        self._pairs: list[tuple[str, str]] = []
        with file.open("rb") as f:
            for line_number, raw_line in enumerate(f, start=1):
                self._pairs.append(self._parse(raw_line, line_number))
        if not self._pairs:
            raise ValueError(f"{self.path}: the file has no sentence pairs")

    def _parse(self, raw_line: bytes, line_number: int) -> tuple[str, str]:
        where = f"{self.path}:{line_number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 ({e.reason})") from e
        line = line.removesuffix("\n").removesuffix("\r")
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(
                f"{where}: expected 'source<TAB>target' (exactly one tab), found "
                f"{len(fields) - 1} tabs in {line[:80]!r}")
        source, target = fields
        for side, text in (("source", source), ("target", target)):
            if not text.strip():
                raise ValueError(f"{where}: the {side} side is empty")
        return source, target

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index):
        return self._pairs[index]
