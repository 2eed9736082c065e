"""ViT classification: the Task, the script's train / predict / attention-map paths, errors."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfx_jax as tfx
import train_toy as toy
from tests.fake_gcs import local_bucket
from tests.scripts import experiment_config as default_config, load_script
from tfx_jax import train as tr
from tfx_jax.apps.attention_maps import cls_attention_maps, save_attention_maps
from tfx_jax.apps.classification import classification_task, load_classifier, vit_config
from tfx_jax.data.image_datasets import load_image_dataset
from tfx_jax.data.image_preprocess import normalize_images

ROOT = pathlib.Path(__file__).resolve().parent.parent
from tfx_jax.apps.classification import experiment as vit_experiment  # noqa: E402

vit_script = load_script(str(ROOT / "experiments" / "vit.py"), "vit_experiment")
TINY_MODEL = dict(patch_size=2, d_model=16, num_heads=2, num_layers=1, d_ff=32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The two script runs train the same tiny ViT on 8x8 batches: the second one reuses the
    first one's compiled init, train and eval steps from JAX's persistent cache."""
    toy.use_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")


def tiny_config(data_dir, **overrides):
    config = default_config("vit")
    config.data_dir = data_dir
    config.model.update(TINY_MODEL)
    config.update(dict(batch_size=16, num_epochs=0, num_train_steps=2, warmup_steps=1,
                       eval_every_epochs=0, eval_every_steps=0, checkpoint_every_steps=0,
                       log_every_steps=1, progress_bar=False))
    config.update(overrides)
    return config


def tiny_vit(**changes):
    cfg = tfx.ViTConfig(image_size=8, patch_size=2, num_channels=1, num_classes=10, d_model=16,
                        num_heads=2, num_layers=2, d_ff=32)
    return tfx.ViT(cfg.replace(**changes))


def test_vit_config_reads_the_model_and_data_keys_and_names_bad_ones():
    config = default_config("vit")
    with pytest.raises(ValueError, match="config.image_shape is not set"):
        vit_config(config)
    config.image_shape, config.num_classes = (8, 8, 1), 10
    cfg = vit_config(config)
    assert (cfg.image_size, cfg.num_channels, cfg.num_classes, cfg.d_model) == (8, 1, 10, 64)
    config.image_shape = (8, 6, 1)
    with pytest.raises(ValueError, match="square"):
        vit_config(config)
    config.image_shape = (8, 8, 1)
    config.model.unknown_key = 3
    with pytest.raises(ValueError, match=r"\['unknown_key'\]"):
        vit_config(config)


def test_classification_loss_is_smoothed_cross_entropy_over_valid_examples():
    model = tiny_vit(num_layers=1)
    task = classification_task(model.config, label_smoothing=0.1)
    params = jax.jit(task.init_params)(jax.random.key(0))
    noise = np.random.default_rng(1)  # NumPy: no compiled program per parameter shape
    params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * noise.standard_normal(x.shape,
                                                                            np.float32),
                          params)  # the head starts at zero: make the logits non-trivial
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 6).astype(np.int32),
             "valid": np.array([1, 1, 1, 1, 0, 0], bool)}
    loss, metrics = jax.jit(task.loss_fn, static_argnums=3)(params, batch, jax.random.key(2),
                                                            False)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch["image"]), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    target = np.full((6, 10), 0.01)
    target[np.arange(6), batch["label"]] += 0.9
    want = -(target * log_probs).sum(-1)[:4].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["weight"]) == 4.0
    np.testing.assert_allclose(float(metrics["accuracy"]),
                               np.mean(logits.argmax(-1)[:4] == batch["label"][:4]))


def test_cls_attention_maps_match_a_numpy_reference():
    model = tiny_vit(num_layers=1)
    images = np.random.default_rng(3).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(4), images)["params"]
    maps = cls_attention_maps(model, params, images)
    assert maps.shape == (2, 1, 2, 4, 4)

    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    patches = images.reshape(2, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 4)
    x = patches @ p["patch_embedding"]["kernel"].reshape(4, 16) + p["patch_embedding"]["bias"]
    x = np.concatenate([np.broadcast_to(p["cls"], (2, 1, 16)), x], 1)
    x = x + p["position"]["embedding"][:17]
    layer = p["encoder"]["layer_0"]
    norm = layer["self_attention_norm"]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    x = x * norm["scale"] + norm["bias"]
    attn = layer["self_attention"]
    q = np.einsum("btd,dnh->btnh", x, attn["query"]["kernel"]) + attn["query"]["bias"]
    k = np.einsum("btd,dnh->btnh", x, attn["key"]["kernel"]) + attn["key"]["bias"]
    scores = np.einsum("bnh,bsnh->bns", q[:, 0], k) / np.sqrt(8)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(maps[:, 0], probs[:, :, 1:].reshape(2, 2, 4, 4), atol=1e-5)


def test_attention_map_figure_has_one_panel_per_layer_and_head(tmp_path):
    maps = np.random.default_rng(0).uniform(size=(3, 2, 4, 4))
    image = np.zeros((8, 8, 1), np.uint8)
    path = str(tmp_path / "maps.png")
    assert save_attention_maps(path, image, maps, title="x") == 3 * 2 + 1
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100
    with pytest.raises(ValueError, match="layers, heads, grid, grid"):
        save_attention_maps(path, image, maps[0])


def _eval_lines(workdir):
    return tr.read_metrics(workdir, split="eval")


@pytest.mark.slow
def test_script_trains_predicts_files_and_draws_attention_on_a_gs_workdir(
        tmp_path, data_dir, capsys, monkeypatch):
    """Training, prediction and attention maps on a gs:// workdir (a fake bucket on local
    disk, tests/fake_gcs.py); nothing bypasses the path layer into ./gs:/. One device: 8 are
    tests/test_train_loop.py's (1 device == 8 devices) and the translation tests'."""
    bucket, cwd = tmp_path / "bucket", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written with os.* on the URL would appear here
    workdir = "gs://tfx-test/vit"
    test = load_image_dataset("digits", "test", data_dir=data_dir)
    paths = []
    for i in (0, 1):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(test[i]["image"][..., 0]).save(paths[-1])
    with local_bucket(bucket):
        result = vit_script.train(tiny_config(data_dir), workdir,
                                  mesh=tr.make_data_mesh(jax.devices()[:1]))
        assert int(result.state.step) == 2
        (line,) = _eval_lines(workdir)
        assert 0.0 <= line["accuracy"] <= 1.0 and line["weight"] == 355

        capsys.readouterr()
        vit_script.predict(workdir, paths, invert=False)
        printed = capsys.readouterr().out.strip().splitlines()
        classifier = load_classifier(workdir)
        probs = classifier.probabilities(normalize_images(np.stack([test[0]["image"],
                                                                    test[1]["image"]])))
        for path, line, p in zip(paths, printed, probs):
            assert line == f"{path}: {classifier.class_names[p.argmax()]} (p={p.max():.3f})"

        vit_script.draw_attention_maps(workdir, paths[:1], invert=False)
        assert ("-> gs://tfx-test/vit/attention/digit0.png (3 panels: the input, 1 layer(s) x "
                "2 head(s))") in capsys.readouterr().out

    local = bucket / "tfx-test" / "vit"
    stored = json.loads((local / "config.json").read_text())
    assert stored["image_shape"] == [8, 8, 1] and stored["num_classes"] == 10
    with Image.open(local / "attention" / "digit0.png") as png:
        assert png.format == "PNG"
    assert not list(cwd.iterdir())  # no ./gs:/ folder: nothing bypassed the path layer


def test_inference_without_a_trained_model_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match=r"no trained model in workdir .* \(no config.json"
                                                r"\); train one first with `python "
                                                r"experiments/vit.py"):
        load_classifier(str(tmp_path))
    config = tiny_config(data_dir, image_shape=(8, 8, 1), num_classes=10)
    tr.save_config(config, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no trained model in workdir"):
        load_classifier(str(tmp_path))
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "vit.py"), f"--workdir={tmp_path}",
         "--predict=missing.png"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == tr.launch.USER_ERROR_EXIT_CODE, run.stderr
    assert "error: no trained model in workdir" in run.stderr


@pytest.mark.slow
def test_script_trains_on_a_tfds_dataset_by_name_with_mock_data(tmp_path, data_dir):
    workdir = str(tmp_path / "mnist")
    # 28x28 MNIST resized to 8x8: the model and batches of the digits run above, so its
    # compiled steps are reused (the resizing path is exercised on the way)
    config = tiny_config(data_dir, dataset="mnist", image_size=8)
    one_device = tr.make_data_mesh(jax.devices()[:1])  # as above
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=24):
        vit_script.train(config, workdir, mesh=one_device)
    stored = tr.load_config(workdir)  # the plan: the dataset decided shape and classes
    assert tuple(stored.image_shape) == (8, 8, 1) and stored.num_classes == 10
    assert config.get("image_shape") is None  # the user's config is not changed
    (line,) = _eval_lines(workdir)
    assert line["weight"] == 24 and 0.0 <= line["accuracy"] <= 1.0


class FakeDigits:
    name, image_shape, num_classes, class_names = "digits", (8, 8, 1), 10, tuple("0123456789")

    def __len__(self):
        return 1442


def test_epochs_set_the_steps_and_the_evaluation_interval():
    config = default_config("vit")
    config.update(dict(num_epochs=3, batch_size=64, eval_every_epochs=2, grad_accum_steps=2,
                       warmup_steps=10))  # < the 35 updates the data decides (checked there)
    plan = vit_experiment.resolve(config, FakeDigits())
    assert plan.num_train_steps == 70  # ceil(1442 / 64) = 23 per epoch, 69 -> multiple of 2
    assert plan.eval_every_steps == 46
    assert plan.job == "vit" and config.num_train_steps != 70  # a frozen copy


@pytest.mark.parametrize("flag", ["predict", "attention_maps"])
def test_an_action_flag_given_empty_is_refused_and_never_trains(tmp_path, flag):
    """Issue 23: --predict="" (say an unset $FILES) must not fall through to training."""
    from absl import flags
    from tfx_jax.errors import ConfigError
    vit_script.define_flags()
    try:
        flags.FLAGS[flag].parse("")
        with pytest.raises(ConfigError, match=f"--{flag} was given without image files"):
            vit_script.main(default_config("vit"), str(tmp_path / "w"))
    finally:
        for name in ("predict", "attention_maps", "invert"):
            delattr(flags.FLAGS, name)
    assert not (tmp_path / "w").exists()


def test_a_workdir_of_another_script_is_named(tmp_path):
    """Issue 23: an lm workdir given to --predict or as DALL-E's classifier names its script."""
    from tfx_jax.errors import WorkdirError
    (tmp_path / "config.json").write_text(default_config("lm").to_json_best_effort())
    with pytest.raises(WorkdirError, match="holds a run of experiments/lm.py .* not of "
                                           "experiments/vit.py"):
        load_classifier(str(tmp_path))
    from tfx_jax.apps.dalle import experiment as dalle_experiment
    config = default_config("dalle")
    config.classifier_workdir = str(tmp_path)
    with pytest.raises(WorkdirError, match="holds a run of experiments/lm.py"):
        dalle_experiment.check(config, tr.make_data_mesh(jax.devices()[:1]))
