"""A user's parallel corpus as a TSV file: ``source<TAB>target`` per line.

The file is UTF-8, one sentence pair per line, exactly one tab per line and
non-empty text on both sides. Line endings ``\\n`` and ``\\r\\n`` are accepted;
text is otherwise kept as written. The whole file is checked when it is
opened, so a bad line fails at start-up with its file and line number rather
than hours into training.

Spreadsheet exports add two things that are not pairs: a UTF-8 byte order
mark (BOM, U+FEFF) before the first character, which is removed, and a
header line such as ``source<TAB>target`` or ``en<TAB>de``. With
``header="auto"`` (the default) a first line whose two fields are both column
names (source/target/src/tgt/input/output/text/..., a language name or code,
optionally with a ``_text`` / ``_lang`` suffix) is skipped; ``header=True``
always skips the first line, ``False`` never does. :attr:`TsvPairs.header`
holds the skipped line (None when nothing was skipped) so callers can say so.
"""

from __future__ import annotations

import collections.abc
import os
import re

from etils import epath

from tfx_jax.errors import ConfigError, DataError, DataNotFound


_COLUMN_WORDS = (
    "source|target|src|tgt|trg|input|output|inputs|targets|text|sentence|translation|"
    "original|reference|question|answer|prompt|response|from|to|lang|language|"
    "english|german|french|spanish|italian|portuguese|dutch|russian|chinese|japanese|"
    "korean|arabic|hindi|turkish|polish|czech|swedish|finnish|greek|romanian|"
    "en|de|fr|es|it|pt|nl|ru|zh|ja|ko|ar|hi|tr|pl|cs|sv|fi|el|ro|uk|vi|id|th|he|da|no|hu|"
    "eng|deu|ger|fra|fre|spa|ita|por|nld|rus|zho|jpn|kor")
_HEADER_FIELD = re.compile(
    rf"^(?:{_COLUMN_WORDS})(?:[-_ ](?:{_COLUMN_WORDS}|text|sentence|lang|language|"
    rf"[a-z]{{2}}))?$")
BOM = "\ufeff"


def looks_like_header(source: str, target: str) -> bool:
    """True when both fields are column names (``source``/``target``, ``en``/``de``, ...)."""
    return all(_HEADER_FIELD.match(field.strip().lower()) for field in (source, target))


class TsvPairs(collections.abc.Sequence):
    """Random-access ``(source_text, target_text)`` pairs read from a TSV file.

    Attributes:
      header: the skipped header line, or None.
      had_bom: whether a UTF-8 byte order mark was removed.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: a line is not valid UTF-8, has no tab or more than one, or
        has an empty side, or a blank line comes before a pair (blank lines at
        the end are ignored); the message names the file and the 1-based line.
    """

    def __init__(self, path: str | os.PathLike, *, header: bool | str = "auto"):
        if header not in (True, False, "auto"):
            raise ConfigError(f"header must be True, False or 'auto', got {header!r}")
        self.path = os.fspath(path)
        file = epath.Path(self.path)  # a local path or a gs:// URL
        if not file.is_file():
            raise DataNotFound(f"TSV parallel corpus not found: {self.path}")
        self._pairs: list[tuple[str, str]] = []
        self.header: str | None = None
        self.had_bom = False
        blank = None  # the first of the blank lines just read: fine at the end of the file
        with file.open("rb") as f:
            for line_number, raw_line in enumerate(f, start=1):
                if line_number == 1:
                    raw_line = self._strip_bom(raw_line)
                    if self._is_header(raw_line, header):
                        self.header = raw_line.decode("utf-8").rstrip("\r\n")
                        continue
                if not raw_line.strip():
                    blank = blank or line_number
                    continue
                if blank is not None:
                    raise DataError(f"{self.path}:{blank}: a blank line between sentence pairs "
                                    f"(only blank lines at the end of the file are ignored)")
                self._pairs.append(self._parse(raw_line, line_number))
        if not self._pairs:
            raise DataError(f"{self.path}: the file has no sentence pairs")

    def _strip_bom(self, raw_line: bytes) -> bytes:
        encoded_bom = BOM.encode("utf-8")
        if raw_line.startswith(encoded_bom):
            self.had_bom = True
            return raw_line[len(encoded_bom):]
        return raw_line

    @staticmethod
    def _is_header(raw_line: bytes, header) -> bool:
        if header != "auto":
            return bool(header)
        try:
            fields = raw_line.decode("utf-8").rstrip("\r\n").split("\t")
        except UnicodeDecodeError:
            return False
        return len(fields) == 2 and looks_like_header(*fields)

    def _parse(self, raw_line: bytes, line_number: int) -> tuple[str, str]:
        where = f"{self.path}:{line_number}"
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e.reason})") from e
        line = line.removesuffix("\n").removesuffix("\r")
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{where}: expected 'source<TAB>target' (exactly one tab), found "
                f"{len(fields) - 1} tabs in {line[:80]!r}")
        source, target = fields
        for side, text in (("source", source), ("target", target)):
            if not text.strip():
                raise DataError(f"{where}: the {side} side is empty")
        return source, target

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index):
        return self._pairs[index]


def write_tsv_pairs(path: str | os.PathLike, pairs) -> int:
    """Writes ``(source, target)`` pairs as a TSV file that :class:`TsvPairs` reads back.

    Returns the number of pairs written. A side that is empty or holds a tab
    or a line break would not read back as one pair: ValueError naming it.
    """
    lines = []
    for index, (source, target) in enumerate(pairs):
        for side, text in (("source", source), ("target", target)):
            if not text or any(c in text for c in "\t\r\n"):
                raise DataError(f"pair {index}: the {side} {text!r} is empty or holds a tab "
                                 f"or a line break")
        lines.append(f"{source}\t{target}\n")
    epath.Path(path).write_text("".join(lines), encoding="utf-8")
    return len(lines)

