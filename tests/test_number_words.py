"""Number-word grammar against hand-written spellings."""
import pytest

from tfx_jax.data import number_words as nw

# Hand-written: (number, English, German, Korean).
KNOWN = [
    (0, "zero", "null", "영"),
    (1, "one", "eins", "일"),
    (7, "seven", "sieben", "칠"),
    (10, "ten", "zehn", "십"),
    (11, "eleven", "elf", "십일"),
    (12, "twelve", "zwölf", "십이"),
    (16, "sixteen", "sechzehn", "십육"),
    (17, "seventeen", "siebzehn", "십칠"),
    (20, "twenty", "zwanzig", "이십"),
    (21, "twenty one", "einundzwanzig", "이십일"),
    (30, "thirty", "dreißig", "삼십"),
    (31, "thirty one", "einunddreißig", "삼십일"),
    (60, "sixty", "sechzig", "육십"),
    (66, "sixty six", "sechsundsechzig", "육십육"),
    (70, "seventy", "siebzig", "칠십"),
    (77, "seventy seven", "siebenundsiebzig", "칠십칠"),
    (100, "one hundred", "einhundert", "백"),
    (101, "one hundred one", "einhunderteins", "백일"),
    (110, "one hundred ten", "einhundertzehn", "백십"),
    (345, "three hundred forty five", "dreihundertfünfundvierzig", "삼백사십오"),
    (999, "nine hundred ninety nine", "neunhundertneunundneunzig", "구백구십구"),
    (1000, "one thousand", "eintausend", "천"),
    (1001, "one thousand one", "eintausendeins", "천일"),
    (1234, "one thousand two hundred thirty four",
     "eintausendzweihundertvierunddreißig", "천이백삼십사"),
    (10000, "ten thousand", "zehntausend", "만"),
    (21000, "twenty one thousand", "einundzwanzigtausend", "이만 천"),
    (23400, "twenty three thousand four hundred",
     "dreiundzwanzigtausendvierhundert", "이만 삼천사백"),
    (101001, "one hundred one thousand one",
     "einhunderteintausendeins", "십만 천일"),
    (700016, "seven hundred thousand sixteen",
     "siebenhunderttausendsechzehn", "칠십만 십육"),
    (999999, "nine hundred ninety nine thousand nine hundred ninety nine",
     "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
     "구십구만 구천구백구십구"),
]


@pytest.mark.parametrize("n,english,german,korean", KNOWN)
def test_known_spellings(n, english, german, korean):
    assert nw.english_number_words(n) == english
    assert nw.german_number_words(n) == german
    assert nw.korean_number_words(n) == korean
    assert [nw.number_words(n, lang) for lang in ("en", "de", "ko")] == [
        english, german, korean]


@pytest.mark.parametrize("n,german", [
    (1, "eins"), (100, "hundert"), (101, "hunderteins"), (1000, "tausend"),
    (1100, "tausendhundert"), (1001, "tausendeins"), (2100, "zweitausendhundert"),
    (101000, "hunderteintausend"), (201, "zweihunderteins")])
def test_german_without_explicit_one(n, german):
    assert nw.german_number_words(n, explicit_one=False) == german


def test_spellings_are_unique_over_a_range():
    # A transduction task needs a one-to-one mapping; check a dense sample.
    numbers = list(range(0, 3000)) + list(range(0, nw.MAX_NUMBER + 1, 997))
    for spell in (nw.english_number_words, nw.german_number_words,
                  nw.korean_number_words):
        spelled = {spell(n) for n in set(numbers)}
        assert len(spelled) == len(set(numbers))


@pytest.mark.parametrize("bad", [-1, nw.MAX_NUMBER + 1])
def test_out_of_range_is_value_error(bad):
    with pytest.raises(ValueError, match="0..999999"):
        nw.english_number_words(bad)


@pytest.mark.parametrize("bad", [1.5, "12", True])
def test_non_int_is_type_error(bad):
    with pytest.raises(TypeError, match="must be an int"):
        nw.german_number_words(bad)


def test_unknown_language():
    with pytest.raises(ValueError, match="language must be one of"):
        nw.number_words(3, "fr")
