"""Vision input data: digits builder, TFDS resolver, Grain pipelines, files."""
import collections

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from tfx_jax.data import grain_batches
from tfx_jax.data.image_pipeline import augment_image, random_translate
from tfx_jax.data.image_datasets import load_image_dataset
from tfx_jax.data.image_preprocess import load_image_files
from tfx_jax.data.image_pipeline import (
    eval_image_batches,
    image_input_shape,
    train_image_batches,
)

FAST = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits_train(data_dir):
    return load_image_dataset("digits", "train", data_dir=data_dir)


@pytest.fixture(scope="module")
def digits_test(data_dir):
    return load_image_dataset("digits", "test", data_dir=data_dir)


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


def _examples(dataset):
    return [dataset.source[i] for i in range(len(dataset))]


def test_digits_splits_are_fixed_stratified_and_disjoint(digits_train, digits_test, sklearn_digits):
    assert (len(digits_train), len(digits_test)) == (1442, 355)
    train_rows = {int(e["index"]) for e in _examples(digits_train)}
    test_rows = {int(e["index"]) for e in _examples(digits_test)}
    assert len(train_rows) == 1442 and len(test_rows) == 355
    assert not train_rows & test_rows
    assert train_rows | test_rows == set(range(1797))
    targets = sklearn_digits.target
    class_sizes = np.bincount(targets)
    test_counts = np.bincount(targets[sorted(test_rows)], minlength=10)
    train_counts = np.bincount(targets[sorted(train_rows)], minlength=10)
    np.testing.assert_array_equal(test_counts, class_sizes // 5)  # every fifth per class
    assert train_counts.min() > 0 and test_counts.min() > 0
    assert digits_train.num_classes == 10 and digits_train.image_shape == (8, 8, 1)
    assert not digits_train.horizontal_flip  # mirrored digits are not digits


def test_digits_pixels_and_labels_match_sklearn(digits_train, digits_test, sklearn_digits):
    raw = sklearn_digits.images.astype(np.int64)  # counts 0..16
    expected = (raw * 255 + 8) // 16  # round(v * 255 / 16), half up, in integers
    for dataset in (digits_train, digits_test):
        for i, example in enumerate(_examples(dataset)):
            row = int(example["index"])
            assert example["image"].dtype == np.uint8
            np.testing.assert_array_equal(example["image"][..., 0], expected[row])
            assert example["label"] == sklearn_digits.target[row]
            assert dataset[i]["label"] == sklearn_digits.target[row]


def test_resolver_errors_name_the_problem(data_dir):
    with pytest.raises(ValueError, match="no_such_dataset"):
        load_image_dataset("no_such_dataset", "train", data_dir=data_dir)
    with pytest.raises(ValueError, match="validation"):
        load_image_dataset("digits", "validation", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="mnist.*not prepared"):
        load_image_dataset("mnist", "train", data_dir=data_dir)


@pytest.mark.parametrize(
    "name, shape, mirror", [("mnist", (28, 28, 1), False), ("cifar10", (32, 32, 3), True)]
)
def test_tfds_image_datasets_through_the_pipeline(data_dir, name, shape, mirror):
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=24):
        dataset = load_image_dataset(name, "train", data_dir=data_dir)
        assert dataset.image_shape == shape and dataset.num_classes == 10
        assert dataset.horizontal_flip == mirror
        batch = next(train_image_batches(dataset, global_batch_size=8, seed=0, read_options=FAST))
        assert batch["image"].shape == (8, *shape) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
        evals = list(eval_image_batches(
            dataset, global_batch_size=16, image_size=12, read_options=FAST))
    assert [b["image"].shape for b in evals] == [(16, 12, 12, shape[-1])] * 2
    assert sum(int(b["valid"].sum()) for b in evals) == 24


def test_train_batches_shapes_dtypes_and_normalisation(digits_test):
    sources = {digits_test[i]["image"].tobytes() for i in range(len(digits_test))}
    batch = next(train_image_batches(
        digits_test, global_batch_size=32, seed=1, augment=False, read_options=FAST))
    assert set(batch) == {"image", "label", "valid"}
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["valid"].dtype == np.bool_ and batch["valid"].all()
    pixels = (batch["image"].astype(np.float64) + 1.0) * 127.5  # [-1, 1] -> 0..255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)
    assert pixels.min() >= -1e-4 and pixels.max() <= 255 + 1e-4
    for image in np.round(pixels).astype(np.uint8):
        assert image.tobytes() in sources  # un-augmented: exactly a stored image

    resized = next(train_image_batches(
        digits_test, global_batch_size=4, seed=1, image_size=(16, 12), read_options=FAST))
    assert resized["image"].shape == (4, 16, 12, 1)
    assert image_input_shape(digits_test, 20) == (20, 20, 1)


def _shifts(image, max_shift):
    """All translations of image by |dy|, |dx| <= max_shift with zero fill."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    span = range(2 * max_shift + 1)
    return [padded[t:t + height, l:l + width].tobytes() for t in span for l in span]


def test_augmentation_translates_flips_only_when_allowed_and_is_seeded(digits_test):
    image = digits_test[0]["image"]
    translations = set(_shifts(image, 1))
    mirrored = set(_shifts(image[:, ::-1].copy(), 1))
    no_flip = [augment_image(image, np.random.default_rng(s), max_shift=1, horizontal_flip=False)
               for s in range(40)]
    assert all(a.shape == image.shape and a.tobytes() in translations for a in no_flip)
    assert len({a.tobytes() for a in no_flip}) > 3  # it does move
    flipped = [augment_image(image, np.random.default_rng(s), max_shift=1, horizontal_flip=True)
               for s in range(40)]
    assert any(a.tobytes() in mirrored - translations for a in flipped)
    np.testing.assert_array_equal(
        random_translate(image, np.random.default_rng(7), 2),
        random_translate(image, np.random.default_rng(7), 2))

    def first_batches(seed):
        it = train_image_batches(digits_test, global_batch_size=16, seed=seed, read_options=FAST)
        return [next(it)["image"] for _ in range(2)]

    run_a, run_b, other = first_batches(3), first_batches(3), first_batches(4)
    np.testing.assert_array_equal(np.stack(run_a), np.stack(run_b))
    assert not np.array_equal(np.stack(run_a), np.stack(other))


def test_restored_iterator_continues_with_the_same_batches(digits_test):
    def make():  # 355 examples / 64 per step: the next batches cross an epoch
        return train_image_batches(digits_test, global_batch_size=64, seed=5, read_options=FAST)

    iterator = make()
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = make()
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_eval_pass_is_padded_and_valid_counts_the_split(digits_test):
    stored = collections.Counter(
        (digits_test[i]["image"].tobytes(), int(digits_test[i]["label"])) for i in range(355))
    seen = collections.Counter()
    num_batches = []
    for process in range(2):
        batches = list(eval_image_batches(digits_test, global_batch_size=64, process_index=process,
                                          process_count=2, read_options=FAST))
        num_batches.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (32, 8, 8, 1) and batch["valid"].shape == (32,)
            assert np.all(batch["image"][~batch["valid"]] == 0)
            pixels = np.round((batch["image"][batch["valid"]] + 1.0) * 127.5).astype(np.uint8)
            labels = batch["label"][batch["valid"]]
            seen.update((p.tobytes(), int(l)) for p, l in zip(pixels, labels))
    assert num_batches == [6, 6]  # ceil(355 / 64) on every process
    assert seen == stored  # each test example exactly once over both processes


def test_process_shards_are_disjoint_and_cover_the_global_batch():
    source = np.arange(50)
    transform = lambda x, rng: {"x": np.int64(x), "r": rng.integers(1 << 30)}  # noqa: E731

    def steps(index, count, num_steps=6):
        it = grain_batches.training_batches(
            source, global_batch_size=8, seed=0, transform=transform,
            process_index=index, process_count=count, read_options=FAST)
        return [next(it) for _ in range(num_steps)]

    single = steps(0, 1)
    shards = [steps(p, 4) for p in range(4)]
    for step, whole in enumerate(single):
        parts = [shards[p][step] for p in range(4)]
        assert all(part["x"].shape == (2,) for part in parts)
        xs = np.concatenate([part["x"] for part in parts])
        assert len(set(xs.tolist())) == 8  # disjoint within the step
        assert sorted(zip(xs.tolist(), np.concatenate([p["r"] for p in parts]).tolist())) == sorted(
            zip(whole["x"].tolist(), whole["r"].tolist()))  # same examples, same randomness
    first_epoch = np.concatenate([b["x"] for b in single])[:48]
    assert len(set(first_epoch.tolist())) == 48  # no repeats inside an epoch
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        grain_batches.training_batches(source, global_batch_size=6, seed=0, transform=transform,
                                       process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        grain_batches.process_shard(4, 4)


def test_load_image_files_matches_the_training_format(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.full((24, 16, 3), 200, np.uint8)).save(tmp_path / "flat.jpg")
    images = load_image_files(
        [tmp_path / "gray.png", tmp_path / "rgb.png", tmp_path / "flat.jpg"], (8, 8, 1))
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.float32
    expected = gray.astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(images[0, ..., 0], expected, atol=1e-6)
    np.testing.assert_allclose(images[1, ..., 0], expected, atol=1e-6)  # RGB grey -> L
    np.testing.assert_allclose(images[2], 200 / 127.5 - 1.0, atol=2 / 127.5)  # JPEG, resized
    inverted = load_image_files([tmp_path / "gray.png"], (8, 8, 1), invert=True)
    np.testing.assert_allclose(inverted[0, ..., 0], (255.0 - gray) / 127.5 - 1.0, atol=1e-6)
    assert load_image_files([tmp_path / "gray.png"], (4, 6, 3)).shape == (1, 4, 6, 3)

    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_files([tmp_path / "broken.png"], (8, 8, 1))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image_files([tmp_path / "missing.png"], (8, 8, 1))
