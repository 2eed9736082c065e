"""DALL-E-style generator: loss, KV-cache sampling, generation, evaluation, the script."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tfx_jax as tfx
from tests.fake_gcs import local_bucket
from tests.scripts import experiment_config as default_config, load_script
from tfx_jax import train as tr
from tfx_jax.apps.dalle import DigitPrompts, GrayLevelTokenizer, JointLayout, PatchVQTokenizer
from tfx_jax.apps.dalle.evaluate import (evaluation_prompts, mean_pairwise_distance,
                                    score_generated_images)
from tfx_jax.apps.dalle.generate import generate_images, sample_sequences, save_image_grid
from tfx_jax.apps.dalle.input_pipeline import train_generator_batches
from tfx_jax.apps.dalle.task import generator_config, generator_task, image_tokenizer_from_config
from tfx_jax.data.image_datasets import load_image_dataset

ROOT = pathlib.Path(__file__).resolve().parent.parent
from tfx_jax.apps.dalle import experiment as dalle_experiment  # noqa: E402

dalle_script = load_script(str(ROOT / "experiments" / "dalle.py"), "dalle_experiment")
PROMPTS = DigitPrompts()
TOKENIZER = GrayLevelTokenizer(num_levels=4)
LAYOUT = JointLayout.for_tokenizers(PROMPTS, TOKENIZER)
TINY_MODEL = dict(num_layers=2, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(data_dir):
    return load_image_dataset("digits", "train", data_dir=data_dir)


@pytest.fixture(scope="module")
def tiny_lm():
    config = default_config("dalle")
    config.model.update(TINY_MODEL)
    model = tfx.CausalLM(generator_config(config, LAYOUT))
    params = jax.jit(generator_task(model.config, layout=LAYOUT).init_params)(jax.random.key(0))
    noise = np.random.default_rng(1)  # NumPy: no compiled program per parameter shape
    params = jax.tree.map(lambda x: np.asarray(x) + 0.3 * noise.standard_normal(x.shape,
                                                                            np.float32),
                          params)  # sharper, input-dependent logits than at init
    return model, params


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_generator_loss_is_the_weighted_next_token_nll(tiny_lm, digits):
    model, params = tiny_lm
    batch = next(train_generator_batches(digits, prompts=PROMPTS, image_tokenizer=TOKENIZER,
                                         global_batch_size=4, seed=0))
    batch["valid"][-1] = False  # an eval padding row: zero weights, no image metrics
    batch["weights"][-1] = 0.0
    task = generator_task(model.config, layout=LAYOUT)
    loss, metrics = jax.jit(task.loss_fn, static_argnums=3)(
        params, batch, jax.random.key(0), False)
    tokens = batch["tokens"]
    logits = jax.jit(model.apply)({"params": params}, tokens[:, :-1])
    nll = -np.take_along_axis(np_log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    weights = batch["weights"][:, 1:]
    np.testing.assert_allclose(float(loss), (weights * nll).sum() / weights.sum(), rtol=1e-5)
    image_nll = nll[:3, LAYOUT.image_position - 1:]
    np.testing.assert_allclose(float(metrics["image_nll"]), image_nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["weight"]), 3.0, rtol=1e-6)


def test_greedy_sampling_with_the_cache_equals_argmax_of_full_passes(tiny_lm):
    model, params = tiny_lm
    prefixes = jnp.asarray(np.stack([LAYOUT.prefix(PROMPTS.encode(t))
                                     for t in ("a handwritten seven", "the digit 3")]))
    greedy = np.asarray(sample_sequences(model, params, prefixes, jax.random.key(0),
                                         layout=LAYOUT, temperature=0.0))
    assert greedy.shape == (2, LAYOUT.sequence_length)
    np.testing.assert_array_equal(greedy[:, :LAYOUT.image_position], prefixes)
    # One uncached pass over the whole result: by causality (tests/test_models.py) the
    # logits at position t - 1 are those of a pass over greedy[:, :t] alone.
    logits = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(greedy[:, :-1])))
    masked = np.where(LAYOUT.image_token_mask(), logits, -np.inf)
    image = slice(LAYOUT.image_position, LAYOUT.sequence_length)
    np.testing.assert_array_equal(greedy[:, image],
                                  masked[:, LAYOUT.image_position - 1:].argmax(-1))
    assert len(np.unique(greedy[:, image])) > 1  # not a degenerate constant image


def test_sampling_keeps_the_prompt_draws_only_image_tokens_and_is_seeded(tiny_lm):
    model, params = tiny_lm
    texts = ["a handwritten seven", "the number 0 written by hand"]
    images = generate_images(model, params, PROMPTS, TOKENIZER, texts, num_samples=3, seed=5,
                             temperature=1.0, top_k=3)
    assert images.shape == (2, 3, 8, 8, 1) and images.dtype == np.uint8
    assert set(np.unique(images)) <= set(TOKENIZER.levels.tolist())
    again = generate_images(model, params, PROMPTS, TOKENIZER, texts, num_samples=3, seed=5,
                            temperature=1.0, top_k=3)
    np.testing.assert_array_equal(images, again)
    other = generate_images(model, params, PROMPTS, TOKENIZER, texts, num_samples=3, seed=6,
                            temperature=1.0, top_k=3)
    assert not np.array_equal(images, other)
    with pytest.raises(ValueError, match="unknown word"):
        generate_images(model, params, PROMPTS, TOKENIZER, ["a handwritten horse"],
                        num_samples=1)


def test_mean_pairwise_distance_matches_brute_force():
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 3, 1)).astype(np.uint8)
    pairs = [np.abs(images[i].astype(float) - images[j]).mean() / 255
             for i in range(5) for j in range(i + 1, 5)]
    np.testing.assert_allclose(mean_pairwise_distance(images), np.mean(pairs))
    assert mean_pairwise_distance(np.repeat(images[:1], 4, 0)) == 0.0


class NearestNeighbourClassifier:
    """A stand-in classifier: the label of the nearest reference image (exact for copies)."""
    image_shape = (8, 8, 1)

    def __init__(self, images, labels):
        self.images = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1
        self.labels = labels

    def predict(self, normalized):
        flat = normalized.reshape(len(normalized), -1)
        nearest = ((flat[:, None] - self.images[None]) ** 2).sum(-1).argmin(1)
        return self.labels[nearest], np.ones(len(flat))


def test_scores_see_through_copying_collapse_and_wrong_digits(digits):
    images = np.stack([digits[i]["image"] for i in range(300)])
    labels = np.asarray([digits[i]["label"] for i in range(300)])
    classifier = NearestNeighbourClassifier(images, labels)
    rows = np.stack([images[labels == d][:6] for d in range(10)])  # 6 real images per digit
    kwargs = dict(real_images=images, real_labels=labels, train_images=images)

    copied = score_generated_images(rows, range(10), classifier, **kwargs)
    assert copied["accuracy"] == 1.0 and copied["copied_fraction"] == 1.0
    assert copied["distinct_fraction"] == 1.0 and 0.5 < copied["diversity_ratio"] < 1.5

    collapsed = score_generated_images(np.repeat(rows[:, :1], 6, 1), range(10), classifier,
                                       **kwargs)
    assert collapsed["sample_diversity"] == 0.0 and collapsed["distinct_fraction"] == 1 / 6

    wrong = score_generated_images(np.roll(rows, 1, axis=0), range(10), classifier, **kwargs)
    assert wrong["accuracy"] == 0.0
    assert [p["predicted_counts"][(d - 1) % 10] for d, p in
            enumerate(wrong["per_prompt"])] == [6] * 10

    novel = score_generated_images(255 - rows, range(10), classifier, **kwargs)
    assert novel["copied_fraction"] == 0.0
    with pytest.raises(ValueError, match="samples >= 2"):
        score_generated_images(rows[:, :1], range(10), classifier, **kwargs)


def test_evaluation_prompts_cover_every_digit_and_parse_back():
    pairs = evaluation_prompts(PROMPTS)
    assert [digit for digit, _ in pairs] == list(range(10))
    assert all(PROMPTS.parse(text) == digit for digit, text in pairs)
    assert len({text.replace(str(d), "#") for d, text in pairs}) > 5  # varied templates


def test_image_grid_png(tmp_path):
    path = str(tmp_path / "grid.png")
    save_image_grid(path, np.zeros((2, 3, 8, 8, 1), np.uint8), ["a", "b"])
    with Image.open(path) as png:
        assert png.format == "PNG"
    with pytest.raises(ValueError, match="2 row titles for 3 rows"):
        save_image_grid(path, np.zeros((3, 3, 8, 8, 1), np.uint8), ["a", "b"])


def test_patch_vq_tokenizer_is_fitted_once_and_kept_in_the_workdir(tmp_path, digits):
    config = default_config("dalle")
    config.image_tokenizer = "patch_vq"
    config.codebook_size = 16
    images = np.stack([digits[i]["image"] for i in range(200)])
    fitted = image_tokenizer_from_config(config, str(tmp_path), images)
    assert isinstance(fitted, PatchVQTokenizer) and fitted.vocab_size <= 16
    loaded = image_tokenizer_from_config(config, str(tmp_path))  # no images: from the file
    np.testing.assert_array_equal(loaded.codebook, fitted.codebook)
    config.image_tokenizer = "dvae"
    with pytest.raises(ValueError, match="gray_levels"):
        image_tokenizer_from_config(config, str(tmp_path))


@pytest.mark.slow
def test_script_trains_generates_and_evaluates_on_a_gs_workdir(tmp_path, data_dir, digits,
                                                               capsys, monkeypatch):
    """The whole script on a gs:// workdir (a fake bucket on local disk, tests/fake_gcs.py):
    every file it writes and reads back goes through the path layer, none lands in ./gs:/."""
    bucket, cwd = tmp_path / "bucket", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written with os.* on the URL would appear here
    workdir = "gs://tfx-test/dalle"
    config = default_config("dalle")
    config.model.update(TINY_MODEL)
    config.update(dict(data_dir=data_dir, batch_size=16, num_train_steps=2, warmup_steps=1,
                       eval_every_steps=0, checkpoint_every_steps=0, log_every_steps=1,
                       image_tokenizer="patch_vq", codebook_size=8, progress_bar=False,
                       samples_per_prompt=2))
    images = np.stack([digits[i]["image"] for i in range(300)])
    labels = np.asarray([digits[i]["label"] for i in range(300)])
    monkeypatch.setattr(dalle_experiment, "load_classifier",
                        lambda _: NearestNeighbourClassifier(images, labels))
    with local_bucket(bucket):
        result = dalle_script.train(config, workdir, mesh=tr.make_data_mesh(jax.devices()[:1]))
        assert int(result.state.step) == 2
        (line,) = tr.read_metrics(workdir, split="eval")
        assert line["weight"] == pytest.approx(355, rel=1e-5) and np.isfinite(line["image_nll"])

        # generation reloads config.json, patch_vq.npz and the checkpoint from the bucket;
        # the evaluation prompts, so that evaluate() below reuses the compiled sampler
        texts = [text for _, text in evaluation_prompts(PROMPTS)]
        dalle_script.generate(config, workdir, texts, None)
        assert "10 prompt(s) x 2 samples -> gs://tfx-test/dalle/generated/" in \
            capsys.readouterr().out
        with pytest.raises(ValueError, match="classifier_workdir"):
            dalle_script.evaluate(config, workdir)
        config.classifier_workdir = "gs://tfx-test/vit"  # the stand-in classifier above
        dalle_script.evaluate(config, workdir)
        assert "report -> gs://tfx-test/dalle/generation_eval.json" in capsys.readouterr().out
        assert [r["split"] for r in tr.read_metrics(workdir)][-1] == "eval"
        with pytest.raises(FileNotFoundError, match="no config.json"):
            dalle_script.generate(config, "gs://tfx-test/empty", ["the digit 3"], None)

    local = bucket / "tfx-test" / "dalle"
    assert json.loads((local / "config.json").read_text())["image_tokenizer"] == "patch_vq"
    assert PatchVQTokenizer.load(str(local / "patch_vq.npz")).vocab_size <= 8
    assert json.loads((local / "generation_eval.json").read_text())["step"] == 2
    with Image.open(local / "generated" / "a_handwritten_zero.png") as png:
        assert png.format == "PNG"
    assert (local / "checkpoints" / "2").is_dir()
    assert list((local / "tensorboard").iterdir())
    assert not list(cwd.iterdir())  # no ./gs:/ folder: nothing bypassed the path layer


def test_evaluate_generator_scores_samples_for_ten_prompts(tiny_lm, digits):
    from tfx_jax.apps.dalle.evaluate import evaluate_generator, scalar_metrics
    model, params = tiny_lm
    images = np.stack([digits[i]["image"] for i in range(100)])
    labels = np.asarray([digits[i]["label"] for i in range(100)])
    report, samples = evaluate_generator(
        model, params, PROMPTS, TOKENIZER, NearestNeighbourClassifier(images, labels),
        train_images=images, test_images=images, test_labels=labels, num_samples=2, seed=1)
    assert samples.shape == (10, 2, 8, 8, 1) and report["num_samples"] == 20
    assert [p["prompt"] for p in report["per_prompt"]] == [t for _, t in
                                                           evaluation_prompts(PROMPTS)]
    assert report["sampling"]["seed"] == 1 and "per_prompt" not in scalar_metrics(report)


def test_generate_given_empty_is_refused_and_never_trains(tmp_path):
    """Issue 23: dalle.py --generate="" must not fall through to training."""
    from absl import flags
    from tfx_jax.errors import ConfigError
    dalle_script.define_flags()
    try:
        flags.FLAGS["generate"].parse("")
        with pytest.raises(ConfigError, match="--generate was given without prompts"):
            dalle_script.main(default_config("dalle"), str(tmp_path / "w"))
    finally:
        for name in ("generate", "output", "evaluate"):
            delattr(flags.FLAGS, name)
    assert not (tmp_path / "w").exists()
