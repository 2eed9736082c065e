"""``number_words``: a built-in, offline translation dataset for transduction.

Each example is one whole number spelled in English and in a target language,
``{"number": 345, "en": "three hundred forty five",
"de": "dreihundertfünfundvierzig"}`` (grammar in ``number_words_grammar.py``).
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
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tfx_jax.errors import ConfigError
from tfx_jax.data import number_words_grammar as number_words
from tfx_jax.data.tfds_translation import TranslationPairs, translation_direction

SOURCE_LANGUAGE = "en"
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False, kw_only=True)
class NumberWordsConfig(tfds.core.BuilderConfig):
    """Which target language, which numbers and how many in each split."""

    target_language: str = "de"
    max_number: int = number_words.MAX_NUMBER
    train_size: int = 50_000
    validation_size: int = 1_000
    test_size: int = 2_000
    split_seed: int = 0
    train_all_below: int = 1_000
    small_number_repeats: int = 5

    def __post_init__(self):
        if self.target_language not in number_words.LANGUAGES or (
            self.target_language == SOURCE_LANGUAGE):
            raise ConfigError(
                f"target_language must be one of "
                f"{[l for l in number_words.LANGUAGES if l != SOURCE_LANGUAGE]}, "
                f"got {self.target_language!r}")
        if not 0 <= self.max_number <= number_words.MAX_NUMBER:
            raise ConfigError(f"max_number must be in 0..{number_words.MAX_NUMBER}, "
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
                SOURCE_LANGUAGE: number_words.number_words(n, SOURCE_LANGUAGE),
                target: number_words.number_words(n, target),
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
