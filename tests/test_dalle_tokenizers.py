"""DALL-E-style tokenisation: image tokens, prompt grammar, joint sequences."""
import itertools

import grain
import numpy as np
import pytest

from tfx_jax.apps.dalle import (
    BOI_ID,
    PROMPT_TEMPLATES,
    DigitPrompts,
    GrayLevelTokenizer,
    JointLayout,
    PatchVQTokenizer,
    eval_generator_batches,
    train_generator_batches,
)
from tfx_jax.data import tokenizer as tok
from tfx_jax.data.tokenizer import BOS_ID, PAD_ID
from tfx_jax.apps.dalle.image_tokens import image_patches, kmeans, patches_to_images
from tfx_jax.data.image_datasets import load_image_dataset

FAST = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def digits_test(tmp_path_factory):
    return load_image_dataset("digits", "test", data_dir=str(tmp_path_factory.mktemp("tfds")))


def _random_images(n, shape=(8, 8, 1), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ---------------------------------------------------------------- grey levels


@pytest.mark.parametrize("num_levels", [2, 8, 16])
def test_gray_levels_round_trip_and_error_bound(num_levels):
    tokenizer = GrayLevelTokenizer(image_shape=(8, 8, 1), num_levels=num_levels)
    levels = np.array([round(k * 255 / (num_levels - 1) + 1e-9) for k in range(num_levels)])
    rng = np.random.default_rng(num_levels)
    quantised = levels[rng.integers(0, num_levels, (6, 8, 8, 1))].astype(np.uint8)
    tokens = tokenizer.encode(quantised)
    assert tokens.shape == (6, 64) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokenizer.decode(tokens), quantised)
    np.testing.assert_array_equal(levels[tokens], quantised.reshape(6, 64))

    images = _random_images(6, seed=num_levels)
    error = np.abs(tokenizer.decode(tokenizer.encode(images)).astype(int) - images)
    assert error.max() <= 255 / (2 * (num_levels - 1)) + 0.5


def test_gray_levels_read_pixels_in_raster_order():
    tokenizer = GrayLevelTokenizer(image_shape=(4, 5, 1), num_levels=4)
    image = np.zeros((4, 5, 1), np.uint8)
    image[2, 3] = 255
    tokens = tokenizer.encode(image)
    assert tokens.shape == (20,)
    assert np.flatnonzero(tokens).tolist() == [2 * 5 + 3] and tokens[13] == 3


def test_seventeen_levels_represent_digits_exactly(digits_test):
    tokenizer = GrayLevelTokenizer(num_levels=17)  # digits store counts 0..16
    images = np.stack([digits_test[i]["image"] for i in range(40)])
    np.testing.assert_array_equal(tokenizer.decode(tokenizer.encode(images)), images)


def test_gray_levels_reject_bad_input():
    tokenizer = GrayLevelTokenizer()
    with pytest.raises(TypeError, match="uint8"):
        tokenizer.encode(np.zeros((8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8, 8, 1\]"):
        tokenizer.encode(np.zeros((8, 7, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        tokenizer.decode(np.full(64, 8))
    with pytest.raises(ValueError, match="grey"):
        GrayLevelTokenizer(image_shape=(8, 8, 3))


# ---------------------------------------------------------------- patch VQ


def test_patches_are_raster_ordered_and_invertible():
    images = _random_images(3, shape=(4, 6, 2))
    patches = image_patches(images, 2)
    assert patches.shape == (3, 6, 8)
    np.testing.assert_array_equal(patches[:, 0], images[:, :2, :2].reshape(3, 8))
    np.testing.assert_array_equal(patches[:, 1], images[:, :2, 2:4].reshape(3, 8))
    np.testing.assert_array_equal(patches[:, 3], images[:, 2:4, :2].reshape(3, 8))
    np.testing.assert_array_equal(patches_to_images(patches, (4, 6, 2), 2), images)


def test_kmeans_finds_well_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    points = np.concatenate([c + rng.normal(size=(50, 2)) for c in centres])
    found = kmeans(points, 3, iterations=10, rng=np.random.default_rng(1))
    distances = np.linalg.norm(found[:, None] - centres[None], axis=-1)
    assert sorted(distances.argmin(axis=1).tolist()) == [0, 1, 2]
    assert distances.min(axis=1).max() < 1.0


def test_patch_vq_is_nearest_codeword_and_round_trips(digits_test, tmp_path):
    images = np.stack([digits_test[i]["image"] for i in range(200)])
    tokenizer = PatchVQTokenizer.fit(images, codebook_size=16, iterations=5, seed=0)
    assert tokenizer.sequence_length == 16 and 1 < tokenizer.vocab_size <= 16
    tokens = tokenizer.encode(images[:20])
    assert tokens.shape == (20, 16) and tokens.dtype == np.int32
    # nearest codeword, by brute force in float64
    patches = image_patches(images[:20], 2).astype(np.float64)
    codebook = tokenizer.codebook.astype(np.float64)
    distances = ((patches[:, :, None, :] - codebook[None, None]) ** 2).sum(-1)
    chosen = np.take_along_axis(distances, tokens[..., None].astype(np.int64), axis=-1)[..., 0]
    np.testing.assert_allclose(chosen, distances.min(-1))
    decoded = tokenizer.decode(tokens)
    np.testing.assert_array_equal(tokenizer.encode(decoded), tokens)  # exact on codeword images
    np.testing.assert_array_equal(tokenizer.decode(tokenizer.encode(decoded)), decoded)
    assert np.abs(decoded.astype(int) - images[:20]).mean() < 40  # a rough, not a random, picture

    tokenizer.save(tmp_path / "vq.npz")
    loaded = PatchVQTokenizer.load(tmp_path / "vq.npz")
    np.testing.assert_array_equal(loaded.codebook, tokenizer.codebook)
    np.testing.assert_array_equal(loaded.encode(images[:20]), tokens)


# ---------------------------------------------------------------- prompts


def test_every_prompt_of_the_grammar_parses_to_its_label():
    prompts = DigitPrompts()
    assert len(PROMPT_TEMPLATES) >= 4 and prompts.max_length == 6
    for label, template, numeral in itertools.product(range(10), range(len(PROMPT_TEMPLATES)),
                                                      (False, True)):
        text = prompts.prompt(label, template, numeral=numeral)
        assert (str(label) if numeral else WORDS[label]) in text.split()
        assert prompts.parse(text) == label
        assert prompts.decode(prompts.encode(text)) == text
    assert prompts.parse("A Handwritten  SEVEN") == 7
    assert prompts.parse("the digit 7") == prompts.parse("an image of the number seven") == 7


def test_prompt_sampling_is_deterministic_and_varied():
    prompts = DigitPrompts()
    first = [prompts.sample(3, np.random.default_rng(s)) for s in range(30)]
    again = [prompts.sample(3, np.random.default_rng(s)) for s in range(30)]
    assert first == again
    assert len(set(first)) >= 6
    assert all(prompts.parse(p) == 3 for p in first)


def test_prompt_errors_list_vocabulary_or_grammar():
    prompts = DigitPrompts()
    assert prompts.vocab_size == len(set(prompts.vocab)) == 32
    with pytest.raises(ValueError, match=r"unknown word.*'cat'.*handwritten.*seven"):
        prompts.parse("a handwritten cat")
    with pytest.raises(ValueError, match="unknown word"):
        prompts.encode("a drawing of 7")
    with pytest.raises(ValueError, match="grammar"):
        prompts.parse("seven the digit")
    with pytest.raises(ValueError, match="exactly one digit"):
        prompts.parse("the digit seven 7")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompts.decode([0, 99])


# ---------------------------------------------------------------- joint sequence


def test_joint_sequence_layout_split_inverts_join():
    layout = JointLayout(text_vocab_size=32, image_vocab_size=8, max_text_length=6, image_length=64)
    # the project's reserved ids (0..3) + BOI (4) + 32 words + 8 codes
    assert (layout.vocab_size, layout.sequence_length, layout.image_position) == (45, 72, 8)
    assert (PAD_ID, BOS_ID) == (tok.PAD_ID, tok.BOS_ID)  # one set of special ids
    assert BOI_ID not in (tok.PAD_ID, tok.EOS_ID, tok.BOS_ID, tok.UNK_ID)
    text_range = set(range(layout.text_offset, layout.text_offset + 32))
    image_range = set(range(layout.image_offset, layout.image_offset + 8))
    assert not text_range & image_range
    assert not {PAD_ID, BOS_ID, BOI_ID} & (text_range | image_range)
    rng = np.random.default_rng(0)
    for num_words in (1, 3, 6):
        text = rng.integers(0, 32, num_words)
        image = rng.integers(0, 8, 64)
        tokens = layout.join(text, image)
        assert tokens.shape == (72,) and tokens.dtype == np.int32
        assert tokens[0] == BOS_ID and tokens[7] == BOI_ID
        assert np.all(tokens[1 + num_words:7] == PAD_ID)
        np.testing.assert_array_equal(tokens[:8], layout.prefix(text))
        words, pixels = layout.split(tokens)
        np.testing.assert_array_equal(words, text)
        np.testing.assert_array_equal(pixels, image)
    batch = np.stack([layout.join([1, 2], np.arange(64) % 8), layout.join([3], np.zeros(64, int))])
    np.testing.assert_array_equal(layout.image_ids(batch)[0], np.arange(64) % 8)
    mask = layout.image_token_mask()
    assert mask.sum() == 8 and mask[layout.image_offset:].all()


def test_joint_sequence_rejects_malformed_input():
    layout = JointLayout(text_vocab_size=32, image_vocab_size=8, max_text_length=6, image_length=4)
    with pytest.raises(ValueError, match="1..6"):
        layout.join(list(range(7)), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        layout.join([1], [0, 1, 2, 8])
    tokens = layout.join([1, 2], [0, 1, 2, 3])
    broken = tokens.copy()
    broken[7] = 5  # BOI overwritten
    with pytest.raises(ValueError, match="BOI"):
        layout.split(broken)
    broken = tokens.copy()
    broken[4] = layout.text_offset  # a word after padding
    with pytest.raises(ValueError, match="padding"):
        layout.split(broken)
    broken = tokens.copy()
    broken[-1] = layout.text_offset  # a word where an image token belongs
    with pytest.raises(ValueError, match="image"):
        layout.split(broken)


def test_loss_weights_follow_dalle_text_image_split():
    layout = JointLayout(text_vocab_size=32, image_vocab_size=8, max_text_length=6, image_length=64)
    weights = layout.loss_weights(num_words=3, text_weight=1 / 8)
    np.testing.assert_allclose(weights[1:4].sum(), 1 / 8, rtol=1e-6)
    np.testing.assert_allclose(weights[8:].sum(), 7 / 8, rtol=1e-6)
    assert weights[0] == 0 and np.all(weights[4:8] == 0)  # BOS, text padding, BOI
    np.testing.assert_allclose(weights[8:], 7 / 8 / 64)


# ---------------------------------------------------------------- generator batches


def test_generator_batches_pair_prompts_with_their_images(digits_test):
    prompts, tokenizer = DigitPrompts(), GrayLevelTokenizer(num_levels=8)
    layout = JointLayout.for_tokenizers(prompts, tokenizer)
    stored = {tokenizer.encode(digits_test[i]["image"]).tobytes(): int(digits_test[i]["label"])
              for i in range(len(digits_test))}

    def make():
        return train_generator_batches(digits_test, prompts=prompts, image_tokenizer=tokenizer,
                                       global_batch_size=16, seed=0, read_options=FAST)

    iterator = make()
    batch = next(iterator)
    assert batch["tokens"].shape == (16, 72) and batch["tokens"].dtype == np.int32
    assert batch["weights"].shape == (16, 72) and batch["weights"].dtype == np.float32
    np.testing.assert_allclose(batch["weights"].sum(axis=1), 1.0, rtol=1e-5)
    for tokens, label in zip(batch["tokens"], batch["label"]):
        words, image = layout.split(tokens)
        assert prompts.parse(prompts.decode(words)) == label
        assert stored[image.astype(np.int32).tobytes()] == label  # the image of that label

    state = iterator.get_state()
    expected = [next(iterator)["tokens"] for _ in range(2)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(restored)["tokens"], want)

    evals = list(eval_generator_batches(digits_test, prompts=prompts, image_tokenizer=tokenizer,
                                        global_batch_size=128, read_options=FAST))
    assert len(evals) == 3 and sum(int(b["valid"].sum()) for b in evals) == 355
    last = evals[-1]
    padding = ~last["valid"]
    assert padding.any() and np.all(last["weights"][padding] == 0)
    assert np.all(last["tokens"][padding] == 0)
    first_prompt = prompts.decode(layout.split(evals[0]["tokens"][0])[0])
    assert first_prompt == f"a handwritten {WORDS[evals[0]['label'][0]]}"


def test_generator_rejects_mismatched_tokenizer(digits_test):
    with pytest.raises(ValueError, match=r"\(4, 4, 1\)"):
        train_generator_batches(digits_test, prompts=DigitPrompts(),
                                image_tokenizer=GrayLevelTokenizer(image_shape=(4, 4, 1)),
                                global_batch_size=8, seed=0)
