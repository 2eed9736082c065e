"""Spelling whole numbers as words in English, German and Korean.

This is the grammar behind the built-in ``number_words`` translation task
(see ``number_words_dataset.py``). The three spellings of one number differ in
ways a sequence-transduction model has to learn, which is what makes the task
a real translation rather than a word-for-word substitution:

* English writes tens before units, one word each: ``"twenty one"``.
* German puts the units before the tens, joined by ``"und"``, and writes the
  whole number below one million as a single compound word:
  ``"einundzwanzig"``, ``"dreihundertfünfundvierzig"``. The digit one is
  ``"eins"`` when it stands at the end (``"hunderteins"``) and ``"ein"``
  inside a compound (``"einundzwanzig"``, ``"einhundert"``); ``sechzehn``,
  ``siebzehn``, ``sechzig`` and ``siebzig`` drop letters of ``sechs``/``sieben``.
* Sino-Korean groups digits by ten thousand (만), not by thousand, omits a
  leading "one" before 십/백/천/만 (``"십"``, not ``"일십"``) and, following
  the Korean orthography rule for numbers written in Hangul, puts a space
  after each 만 group: ``23400 -> "이만 삼천사백"``.

English follows the American style without "and" or hyphens
(``101 -> "one hundred one"``, ``21 -> "twenty one"``), lower case, words
separated by single spaces. German writes hundreds and thousands with an
explicit "one" (``"einhundert"``, ``"eintausend"``) by default, as on a bank
cheque; pass ``explicit_one=False`` for the also-correct ``"hundert"`` and
``"tausend"``.

Supported range: ``0 <= n <= MAX_NUMBER`` (999,999).
"""

from __future__ import annotations

import numbers

MAX_NUMBER = 999_999
LANGUAGES = ("en", "de", "ko")

_ENGLISH_BELOW_20 = (
    "zero one two three four five six seven eight nine ten eleven twelve "
    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_ENGLISH_TENS = (
    "_ _ twenty thirty forty fifty sixty seventy eighty ninety"
).split()

# German units as they appear inside a compound ("ein" not "eins").
_GERMAN_UNITS = "_ ein zwei drei vier fünf sechs sieben acht neun".split()
_GERMAN_10_TO_19 = (
    "zehn elf zwölf dreizehn vierzehn fünfzehn sechzehn siebzehn achtzehn "
    "neunzehn"
).split()
_GERMAN_TENS = (
    "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig"
).split()

_KOREAN_DIGITS = "_ 일 이 삼 사 오 육 칠 팔 구".split()
_KOREAN_PLACES = ((1000, "천"), (100, "백"), (10, "십"))


def _check_number(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"number must be an int, got {type(n).__name__}: {n!r}")
    n = int(n)
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number must be in 0..{MAX_NUMBER}, got {n}")
    return n


def _english_below_1000(n: int) -> list[str]:
    words = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ENGLISH_BELOW_20[hundreds], "hundred"]
    if rest >= 20:
        tens, units = divmod(rest, 10)
        words.append(_ENGLISH_TENS[tens])
        if units:
            words.append(_ENGLISH_BELOW_20[units])
    elif rest:
        words.append(_ENGLISH_BELOW_20[rest])
    return words


def english_number_words(n: int) -> str:
    """American English words for ``n``: ``345 -> "three hundred forty five"``."""
    n = _check_number(n)
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        words += _english_below_1000(thousands) + ["thousand"]
    words += _english_below_1000(rest)
    return " ".join(words)


def _german_below_100(n: int) -> str:
    """Compound form of 1..99, with "ein" (not "eins") for a trailing one."""
    if n < 10:
        return _GERMAN_UNITS[n]
    if n < 20:
        return _GERMAN_10_TO_19[n - 10]
    tens, units = divmod(n, 10)
    if units == 0:
        return _GERMAN_TENS[tens]
    return _GERMAN_UNITS[units] + "und" + _GERMAN_TENS[tens]


def _german_below_1000(n: int, explicit_one: bool) -> str:
    hundreds, rest = divmod(n, 100)
    word = ""
    if hundreds:
        word = ("" if hundreds == 1 and not explicit_one
                else _GERMAN_UNITS[hundreds]) + "hundert"
    if rest:
        word += _german_below_100(rest)
    return word


def german_number_words(n: int, *, explicit_one: bool = True) -> str:
    """German words for ``n``: ``345 -> "dreihundertfünfundvierzig"``.

    Args:
      n: integer in ``0..MAX_NUMBER``.
      explicit_one: write ``"einhundert"``/``"eintausend"`` (True) or
        ``"hundert"``/``"tausend"`` (False) for a leading one hundred/thousand.
    """
    n = _check_number(n)
    if n == 0:
        return "null"
    thousands, rest = divmod(n, 1000)
    word = ""
    if thousands:
        word = ("" if thousands == 1 and not explicit_one
                else _german_below_1000(thousands, explicit_one)) + "tausend"
    if rest:
        word += _german_below_1000(rest, explicit_one)
    # A one that ends the number is "eins" ("hunderteins"), but not when it is
    # part of "einundzwanzig"-like words, which never end in "ein".
    if word.endswith("ein"):
        word += "s"
    return word


def _korean_below_10000(n: int) -> str:
    word = ""
    for value, place in _KOREAN_PLACES:
        digit, n = divmod(n, value)
        if digit:
            word += ("" if digit == 1 else _KOREAN_DIGITS[digit]) + place
    if n:
        word += _KOREAN_DIGITS[n]
    return word


def korean_number_words(n: int) -> str:
    """Sino-Korean words for ``n``: ``23400 -> "이만 삼천사백"``."""
    n = _check_number(n)
    if n == 0:
        return "영"
    myriads, rest = divmod(n, 10_000)
    groups = []
    if myriads:
        groups.append(("" if myriads == 1 else _korean_below_10000(myriads)) + "만")
    if rest:
        groups.append(_korean_below_10000(rest))
    return " ".join(groups)


def number_words(n: int, language: str) -> str:
    """Spells ``n`` in ``language`` (one of ``LANGUAGES``: "en", "de", "ko")."""
    if language == "en":
        return english_number_words(n)
    if language == "de":
        return german_number_words(n)
    if language == "ko":
        return korean_number_words(n)
    raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
