"""``number_words``: a built-in, offline translation dataset for transduction.

Each example is one whole number spelled in English and in a target language,
``{"number": 345, "en": "three hundred forty five",
"de": "dreihundertfünfundvierzig"}`` (the grammar
below).
Translating English to German number words needs what a Transformer's
attention provides: German reorders units before tens ("einundzwanzig") and
fuses the number into one compound word, so output tokens depend on input
words that are far apart and in another order. The ``en_ko`` config instead
regroups digits by ten thousand (Sino-Korean 만).

The numbers below ``train_all_below`` (1,000) are all in ``train``, each
``small_number_repeats`` (5) times: they are the words every larger number is
built from, a learner's lexicon, and hold the irregular forms ("eins",
"sechzehn", "siebzig", "null"); in a uniform draw from 0..999,999 short
inputs such as "twenty one" would be 0.1% of the data and a model would fail
on them. The other numbers up to ``max_number`` are put in a fixed random
order (a permutation seeded by ``split_seed``); the first ``test_size`` go to
``test``, the next ``validation_size`` to ``validation`` and the next ones
fill ``train`` up to ``train_size`` distinct numbers. The splits are therefore
disjoint: a model is scored on numbers it never saw. Because test comes first,
growing ``train_size`` never moves a number out of the test split.

The data are generated locally (nothing is downloaded) and written as
ArrayRecord files, which ``tfds.data_source`` and Grain read with random
access and no TensorFlow.

The grammar: spelling whole numbers as words in English, German and Korean.
The three spellings of one number differ in
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

import dataclasses
import numbers

import numpy as np
import tensorflow_datasets as tfds

from tfx_jax.data.text_pairs import TranslationPairs, translation_direction
from tfx_jax.errors import ConfigError


# --- the grammar: numbers as words ---------------------------------------------------------

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


# --- the dataset: a TFDS builder of number-word pairs --------------------------------------

SOURCE_LANGUAGE = "en"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False, kw_only=True)
class NumberWordsConfig(tfds.core.BuilderConfig):
    """Which target language, which numbers and how many in each split."""

    target_language: str = "de"
    max_number: int = MAX_NUMBER
    train_size: int = 50_000
    validation_size: int = 1_000
    test_size: int = 2_000
    split_seed: int = 0
    train_all_below: int = 1_000
    small_number_repeats: int = 5

    def __post_init__(self):
        if self.target_language not in LANGUAGES or (
            self.target_language == SOURCE_LANGUAGE):
            raise ConfigError(
                f"target_language must be one of "
                f"{[l for l in LANGUAGES if l != SOURCE_LANGUAGE]}, "
                f"got {self.target_language!r}")
        if not 0 <= self.max_number <= MAX_NUMBER:
            raise ConfigError(f"max_number must be in 0..{MAX_NUMBER}, "
                             f"got {self.max_number}")
        sizes = {"train_size": self.train_size,
                 "validation_size": self.validation_size,
                 "test_size": self.test_size}
        for field, size in sizes.items():
            if size < 1:
                raise ConfigError(f"{field} must be >= 1, got {size}")
        if sum(sizes.values()) > self.max_number + 1:
            raise ConfigError(
                f"train_size + validation_size + test_size = {sum(sizes.values())} "
                f"exceeds the {self.max_number + 1} numbers in 0..{self.max_number}")
        if self.train_all_below < 0 or (
                min(self.train_all_below, self.max_number + 1) > self.train_size):
            raise ConfigError(
                f"train_all_below={self.train_all_below} puts more numbers in train than "
                f"train_size={self.train_size}; lower it (0: none)")
        if self.small_number_repeats < 1:
            raise ConfigError(f"small_number_repeats must be >= 1, got "
                             f"{self.small_number_repeats}")

    def split_numbers(self) -> dict[str, np.ndarray]:
        """The numbers of each split, disjoint, from a seeded permutation.

        Train lists each number below ``train_all_below`` ``small_number_repeats``
        times, so it has ``train_size`` distinct numbers and more examples.
        """
        order = np.random.default_rng(self.split_seed).permutation(
            self.max_number + 1)
        lexicon = order[order < self.train_all_below]
        order = order[order >= self.train_all_below]
        test_end = self.test_size
        validation_end = test_end + self.validation_size
        train_end = validation_end + self.train_size - len(lexicon)
        return {
            "test": order[:test_end],
            "validation": order[test_end:validation_end],
            "train": np.concatenate([np.repeat(lexicon, self.small_number_repeats),
                                     order[validation_end:train_end]]),
        }


_DEFAULTS = NumberWordsConfig(name="defaults")


def number_words_config(
    target_language: str = "de",
    *,
    max_number: int = _DEFAULTS.max_number,
    train_size: int = _DEFAULTS.train_size,
    validation_size: int = _DEFAULTS.validation_size,
    test_size: int = _DEFAULTS.test_size,
    split_seed: int = _DEFAULTS.split_seed,
    train_all_below: int = _DEFAULTS.train_all_below,
    small_number_repeats: int = _DEFAULTS.small_number_repeats,
) -> NumberWordsConfig:
    """A config named after its values, so different sizes never share files.

    With all defaults the name is ``"en_de"`` / ``"en_ko"`` (the registered
    configs); otherwise e.g. ``"en_de-max9999-train500-validation50-test50-seed0-below100x5"``.
    """
    name = f"{SOURCE_LANGUAGE}_{target_language}"
    values = dict(max_number=max_number, train_size=train_size,
                  validation_size=validation_size, test_size=test_size,
                  split_seed=split_seed, train_all_below=train_all_below,
                  small_number_repeats=small_number_repeats)
    if any(getattr(_DEFAULTS, k) != v for k, v in values.items()):
        name += (f"-max{max_number}-train{train_size}-validation{validation_size}"
                 f"-test{test_size}-seed{split_seed}-below{train_all_below}"
                 f"x{small_number_repeats}")
    return NumberWordsConfig(name=name, target_language=target_language,
                             description=f"English -> {target_language} number "
                             f"words, 0..{max_number}", **values)


class NumberWords(tfds.core.GeneratorBasedBuilder):
    """English number words paired with German (``en_de``) or Korean (``en_ko``)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "All numbers below train_all_below (1,000) are in train, "
                              "small_number_repeats (5) times each."}
    BUILDER_CONFIGS = [number_words_config("de"), number_words_config("ko")]

    def _info(self) -> tfds.core.DatasetInfo:
        target = self.builder_config.target_language
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "number": tfds.features.Scalar(dtype=np.int64),
                SOURCE_LANGUAGE: tfds.features.Text(),
                target: tfds.features.Text(),
            }),
            supervised_keys=(SOURCE_LANGUAGE, target),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Generated locally, nothing to download.
        numbers = self.builder_config.split_numbers()
        return {split: self._generate_examples(numbers[split]) for split in SPLITS}

    def _generate_examples(self, numbers):
        target = self.builder_config.target_language
        for key, n in enumerate(numbers):  # a small number can occur several times
            n = int(n)
            yield key, {
                "number": n,
                SOURCE_LANGUAGE: number_words(n, SOURCE_LANGUAGE),
                target: number_words(n, target),
            }


def prepare_number_words(
    config: NumberWordsConfig | str = "en_de",
    *,
    data_dir: str | None = None,
) -> NumberWords:
    """Generates the dataset as ArrayRecord under ``data_dir`` (once) and returns
    the builder; a second call finds the files and does nothing."""
    builder = NumberWords(config=config, data_dir=data_dir,
                          file_format="array_record")
    builder.download_and_prepare()
    return builder


def number_words_pairs(
    split: str,
    *,
    data_dir: str | None = None,
    config: NumberWordsConfig | str = "en_de",
    source_language: str | None = None,
    target_language: str | None = None,
) -> TranslationPairs:
    """``(source_text, target_text)`` pairs of one split, preparing if needed.

    The direction is English -> target language unless ``source_language`` /
    ``target_language`` say otherwise (e.g. ``source_language="de"`` for
    German -> English).
    """
    builder = prepare_number_words(config, data_dir=data_dir)
    name = f"number_words/{builder.builder_config.name}"
    source_language, target_language = translation_direction(
        name, builder.info.supervised_keys, source_language, target_language)
    return TranslationPairs(builder.as_data_source(split=split), source_language,
                            target_language, name=name)
