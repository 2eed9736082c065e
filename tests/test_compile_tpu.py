"""The real TPU compiler (libtpu), run on this CPU machine for TPU slices described by
name: target names, attention "auto" on a TPU mesh, the models' sharded train steps
holding the Mosaic splash kernel, per-chip bytes on FSDP / tensor meshes, and the
scripts' --compile_topology end to end (exit 0 with its report, exit 2 with one line).

The models are tiny: each compile takes a few seconds.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tfx_jax as tfx
from tests.scripts import experiment_config
from tfx_jax import train as tr
from tfx_jax.apps.classification import classification_task
from tfx_jax.apps.dalle import DigitPrompts, GrayLevelTokenizer, JointLayout
from tfx_jax.apps.dalle.task import generator_config, generator_task
from tfx_jax.apps.language_model.task import lm_task
from tfx_jax.apps.translation.task import translation_task
from tfx_jax.attention import placement, select_implementation
from tfx_jax.train import topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V5E = tr.parse_target("v5e:2x2")
MOSAIC = 'custom_call_target="tpu_custom_call"'


@pytest.mark.parametrize("name,chip,shape,devices", [
    ("v5e:2x4", "v5e", (2, 4), 8), ("v5litepod-16", "v5e", (4, 4), 16),
    ("v6e-8", "v6e", (2, 4), 8), ("v5p-32", "v5p", (2, 2, 4), 16),  # v5p-N: TensorCores
    ("v4-8", "v4", (2, 2, 1), 4), ("tpu7x:2x2x1", "tpu7x", (2, 2, 1), 8),
    ("h100:8x4", "h100", (8, 4), 32), ("H200:8", "h200", (8, 1), 8),
])
def test_target_names(name, chip, shape, devices):
    target = tr.parse_target(name)
    assert (target.chip.name, target.shape, target.num_devices) == (chip, shape, devices)


def test_bad_target_names_say_what_is_accepted():
    for bad, match in (("v5e-8x", "not a target name.*v5litepod-16"),
                       ("v5e:2x2x2", "v5e slices have 2 dimensions"),
                       ("v5p-7", "counts TensorCores"), ("v6e-12", "power-of-two")):
        with pytest.raises(ValueError, match=match):
            tr.parse_target(bad)
    with pytest.raises(ValueError, match="compile_num_slices"):
        tr.parse_target("v5e:2x2", num_slices=0)
    with pytest.raises(ValueError, match="CUDA plugin"):
        topology.target_devices(tr.parse_target("h100:8"))


def test_topology_devices_and_the_mesh_they_make():
    assert jax.devices()[0].platform == "cpu"
    for name, slices, count, kind in (("v5e:2x4", 1, 8, "TPU v5 lite"),
                                      ("v5p-8", 1, 4, "TPU v5"),
                                      ("v5e:2x2", 2, 8, "TPU v5 lite")):
        target = tr.parse_target(name, slices)
        devices = topology.target_devices(target)
        assert len(devices) == count == target.num_devices
        assert {d.device_kind for d in devices} == {kind}
        with tr.compiling_for(target):
            mesh = tr.make_mesh({"data": -1, "fsdp": 2})
        assert mesh.devices.size == count and mesh.devices.flat[0].platform == "tpu"
    assert jax.devices()[0].platform == "cpu"  # nothing probed for a chip


def _tpu_mesh(shape=(2, 1, 2), target=V5E):
    return jax.sharding.Mesh(np.asarray(topology.target_devices(target)).reshape(shape),
                             ("data", "fsdp", "tensor"))


def test_auto_decides_by_the_mesh_in_context():
    q = jnp.zeros((4, 256, 4, 64), jnp.bfloat16)
    assert placement().platform == "cpu"
    assert select_implementation(q, q, causal=True) == "dense"
    with jax.set_mesh(_tpu_mesh()):
        placed = placement()
        assert (placed.platform, placed.device_kind) == ("tpu", "TPU v5 lite")
        assert select_implementation(q, q, causal=True) == "splash"


@pytest.mark.parametrize("kwargs,kv_heads", [
    (dict(causal=True), 4),
    (dict(), 1),                                                      # GQA (MQA), not causal
    (dict(local_window=(100, 0)), 2),
    (dict(causal=True, q_segment_ids=np.repeat([[1] * 200 + [2] * 56], 4, 0)), 2),  # packed
    (dict(kv_lengths=np.array([256, 100, 7, 0])), 4),                 # encoder padding
], ids=["causal", "gqa", "window", "packed", "kv_lengths"])
def test_attention_compiles_to_splash_on_every_mesh_axis(kwargs, kv_heads):
    """Under jax.set_mesh (a user's own jit): batch over data, heads over tensor."""
    mesh = _tpu_mesh()
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q = jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16, sharding=heads)
    kv = jax.ShapeDtypeStruct((4, 256, kv_heads, 64), jnp.bfloat16,
                              sharding=heads if kv_heads % 2 == 0 else None)

    def loss(q, k, v):
        return tfx.dot_product_attention(q, k, v, **kwargs).astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    assert text.count(MOSAIC) == 3  # forward, dq, dkv


def test_splash_blocks_a_chip_cannot_hold_fail_with_a_clear_message():
    from tfx_jax.attention_splash import choose_blocks, computed_tiles
    assert computed_tiles(1024, 1024, 512, 512, True, None) == 3      # causal skips 1 of 4
    assert computed_tiles(1024, 1024, 256, 256, False, (0, 0)) == 4   # the diagonal only
    assert choose_blocks(8192, 8192, 256, 2, "TPU v5 lite") == (512, 512)
    assert choose_blocks(8192, 8192, 128, 2, "TPU v4", block_q=1024, block_kv=512) == (1024, 512)
    assert choose_blocks(384, 8192, 128, 2, "TPU v4") == (384, 512)  # tiles divide lengths
    with pytest.raises(ValueError, match=r"block_q=8192, block_kv=8192 .* 336.0 MiB of VMEM, over the 12 MiB .* TPU v4"):
        choose_blocks(8192, 8192, 256, 2, "TPU v4", block_q=8192, block_kv=8192)


@pytest.mark.parametrize("start,limit,expected", [(8, 44, 44), (64, 44, 44), (8, 2, None),
                                                  (4, 1000, 512)])  # 8 compiles: 4 ... 512
def test_batch_search_finds_the_largest_batch_that_fits(start, limit, expected):
    """Against a stand-in compiler that fits up to ``limit`` rows, on a 4-way batch mesh."""
    calls = []

    def compile_at(batch):
        rows = jax.tree.leaves(batch)[0].shape[0]
        calls.append(rows)
        return {"fits": rows <= limit, "peak_bytes_per_chip": rows}

    with tr.compiling_for(V5E):
        mesh = tr.make_mesh({"data": 4})
    found = topology.search_batch_size(compile_at, {"x": _tokens((start, 16))}, mesh)
    assert found["search"]["batch_size"] == expected and len(calls) <= 8
    assert all(rows % 4 == 0 for rows in calls) and len(set(calls)) == len(calls)
    if expected is not None:
        assert found["peak_bytes_per_chip"] == expected and found["fits"]


# ------------------------------------------------------------------ models as the library trains them
def _compile(task, batch, mesh_config, target=V5E, eval_batch=None):
    optimizer = optax.adamw(1e-3)
    with tr.compiling_for(target):
        mesh = tr.make_mesh(mesh_config)
        return tr.compile_task(task, optimizer, optax.constant_schedule(1e-3), mesh,
                               batch, eval_batch=eval_batch)


def _tokens(shape, vocab=64):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _lm(**changes):
    config = tfx.CausalLMConfig(**{**dict(
        vocab_size=64, max_len=256, num_layers=1, d_model=32, num_heads=4, d_ff=64,
        dtype=jnp.bfloat16), **changes})
    return lm_task(config, max_len=256)


def test_causal_lm_train_step_holds_splash_and_reports():
    batch = {"inputs": _tokens((8, 256)), "targets": _tokens((8, 256))}
    report = _compile(_lm(num_kv_heads=2, position="rope"), batch, {"data": 2, "tensor": 2},
                      eval_batch=batch)
    assert report["steps"]["train"]["custom_calls"] == {"mosaic": 3, "cudnn": 0}
    assert report["steps"]["eval"]["custom_calls"]["mosaic"] == 1
    assert report["fits"] and report["chips"] == 4
    assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    train = report["steps"]["train"]
    # The kernel's FLOPs, which XLA's cost analysis leaves out: one 256 x 256 tile per
    # head (8 rows x 4 heads of 8), 2 matmuls of 2 FLOPs per multiply-add, x 3.5 with the
    # backward, over 4 chips.
    assert train["kernel_flops_per_device"] == 4 * 8 * 4 * 8 * 256 * 256 * 3.5 / 4
    assert train["flops_per_device"] > train["kernel_flops_per_device"] > 0
    assert report["roofline_step_s"] > 0 and 0 < report["mfu_ceiling"] <= 1


def test_transformer_vit_and_dalle_lm_train_steps_hold_splash():
    cfg = tfx.TransformerConfig(vocab_size=64, max_len=256, d_model=32, num_heads=4, d_ff=64,
                                num_encoder_layers=1, num_decoder_layers=1, dtype=jnp.bfloat16)
    packed = {k: _tokens((8, 256)) for k in (
        "inputs", "targets", "inputs_segmentation", "targets_segmentation",
        "inputs_position", "targets_position")}
    report = _compile(translation_task(cfg, max_source_length=256, max_target_length=256),
                      packed, {"data": 4})
    # encoder and decoder self-attention (packed rows); cross-attention of packed rows
    # too (different segment ids): 3 kernels x 3 calls.
    assert report["steps"]["train"]["custom_calls"]["mosaic"] == 9

    vit = tfx.ViTConfig(image_size=30, patch_size=2, num_classes=10, d_model=32, num_heads=4,
                        num_layers=1, d_ff=64, dtype=jnp.bfloat16)  # 225 + [CLS] tokens
    images = {"image": jax.ShapeDtypeStruct((8, 30, 30, 3), jnp.float32),
              "label": jax.ShapeDtypeStruct((8,), jnp.int32),
              "valid": jax.ShapeDtypeStruct((8,), jnp.bool_)}
    report = _compile(classification_task(vit), images, {"data": 2, "fsdp": 2})
    assert report["steps"]["train"]["custom_calls"]["mosaic"] == 3  # 226 padded to 256

    config = experiment_config("dalle")
    config.model.update(num_layers=1, d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)
    layout = JointLayout.for_tokenizers(DigitPrompts(), GrayLevelTokenizer(num_levels=4))
    model_config = generator_config(config, layout)
    rows = layout.sequence_length
    batch = {"tokens": _tokens((8, rows)), "weights": jax.ShapeDtypeStruct((8, rows),
                                                                        jnp.float32),
             "valid": jax.ShapeDtypeStruct((8,), jnp.bool_)}
    calls = _compile(generator_task(model_config, layout=layout), batch, {"data": 4})[
        "steps"]["train"]["custom_calls"]["mosaic"]
    assert calls == (3 if select_implementation(
        jnp.zeros((1, rows - 1, 4, 8)), jnp.zeros((1, rows - 1, 4, 8)), causal=True,
        platform="tpu") == "splash" else 0)


def test_fsdp_and_tensor_meshes_split_the_state_per_chip():
    """fsdp 4 x tensor 2 on v5e:2x4: each chip holds about 1/8 of the state that pure
    data parallelism replicates on every chip."""
    from tfx_jax.train.perf import total_bytes
    batch = {"inputs": _tokens((8, 256)), "targets": _tokens((8, 256))}
    task = _lm(d_model=128, d_ff=512, vocab_size=512, num_heads=4)
    report = _compile(task, batch, {"data": 1, "fsdp": 4, "tensor": 2}, tr.parse_target("v5e:2x4"))
    replicated = total_bytes(tr.abstract_train_state(task.init_params, optax.adamw(1e-3), 0,
                                                     NamedSharding(_tpu_mesh(), P())))
    assert 7.0 < replicated / report["state_bytes_per_chip"] <= 8.0  # norms stay whole
    # The compiled step's own figure falls too, less than 8x: the TPU lays small arrays
    # out in (8, 128) tiles, so a tiny model's shards are padded (measured 4.4x).
    arguments = replicated / report["steps"]["train"]["argument_bytes"]
    assert 4.0 < arguments <= 8.0, arguments
    assert report["steps"]["train"]["custom_calls"]["mosaic"] == 3


# ------------------------------------------------------------------ the scripts, end to end
def _script(name, workdir, *flags, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"),
                           f"--workdir={workdir}", *flags], capture_output=True, text=True,
                          env=env, timeout=timeout)


LM_FLAGS = ("--config.model.num_layers=1", "--config.model.d_model=16",
            "--config.model.num_heads=2", "--config.model.d_ff=32", "--config.max_files=40",
            "--config.vocab_size=400", "--config.tokenizer_max_chars=30000",
            "--config.max_len=128", "--config.max_eval_examples=8", "--config.batch_size=4",
            "--config.eval_batch_size=4", "--config.progress_bar=False")


@pytest.mark.slow
def test_lm_script_compiles_for_a_topology_and_writes_only_its_report(tmp_path):
    done = _script("lm", tmp_path / "run", "--compile_topology=v5litepod-4", *LM_FLAGS)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*")
                   if p.is_file())
    assert files == ["compile/v5litepod-4.json"]
    report = json.loads((tmp_path / "run" / "compile" / "v5litepod-4.json").read_text())
    assert report["chips"] == 4 and report["device_kind"] == "TPU v5 lite" and report["fits"]
    assert report["versions"]["libtpu"] and report["topology"] == "v5e:2x2"
    assert report["steps"]["train"]["custom_calls"]["mosaic"] == 3
    assert "fits" in done.stdout and "Mosaic calls 3" in done.stdout


@pytest.mark.slow
def test_a_run_too_large_for_the_chip_exits_2_with_one_line(tmp_path):
    flags = [f for f in LM_FLAGS if "d_model" not in f and "d_ff" not in f]
    done = _script("lm", tmp_path / "run", "--compile_topology=v5e:2x2", *flags,
                   "--config.model.d_model=4096", "--config.model.d_ff=131072")
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "does not fit v5e:2x2: the train step needs" in line
    # The TPU compiler itself refused the step: its temporaries alone exceed the 15.75
    # GiB it can use of a v5e chip's 16.
    assert re.search(r"needs \d+\.\d\d GiB per chip, a TPU v5 lite chip has 15.75 GiB", line)
    assert "config.mesh.fsdp" in line and "remat_policy" in line and "batch_size" in line
    assert not json.loads((tmp_path / "run" / "compile" / "v5e_2x2.json").read_text())["fits"]


@pytest.mark.slow
@pytest.mark.parametrize("script,flags", [
    ("translate", ("--config.model.d_model=16", "--config.model.num_heads=2",
                   "--config.model.d_ff=32", "--config.model.num_encoder_layers=1",
                   "--config.model.num_decoder_layers=1", "--config.number_words.max_number=999",
                   "--config.number_words.train_all_below=10",
                   "--config.number_words.train_size=64", "--config.number_words.test_size=8",
                   "--config.number_words.validation_size=8", "--config.vocab_size=40",
                   "--config.max_source_length=12", "--config.max_target_length=12",
                   "--config.batch_size=8", "--config.eval_batch_size=8")),
    ("vit", ("--config.model.patch_size=2", "--config.model.d_model=16",
             "--config.model.num_heads=2", "--config.model.num_layers=1",
             "--config.model.d_ff=32", "--config.batch_size=16",
             "--config.image_shape=(8, 8, 1)", "--config.num_classes=10")),
    ("dalle", ("--config.model.num_layers=1", "--config.model.d_model=16",
               "--config.model.num_heads=2", "--config.model.d_ff=32", "--config.batch_size=16")),
])
def test_scripts_compile_for_a_topology(script, flags, tmp_path):
    done = _script(script, tmp_path / "run", "--compile_topology=v5e:2x2",
                   f"--config.data_dir={tmp_path / 'tfds'}", "--config.progress_bar=False",
                   *flags)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "compile" / "v5e_2x2.json").read_text())
    assert report["fits"] and set(report["steps"]) == {"train", "eval"}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["compile"]
    # every script compiles from the config alone: its dataset is never prepared
    assert not (tmp_path / "tfds").exists()


class _Chars:
    """ids 4.. for letters (no SentencePiece needed)."""
    vocab_size = 32

    def encode(self, text):
        return [4 + (ord(c) - ord("a")) % 26 for c in text]


def _structure(batch):
    return {key: (tuple(np.shape(value)), np.asarray(value).dtype if not hasattr(
        value, "dtype") else np.dtype(value.dtype)) for key, value in batch.items()}


@pytest.mark.parametrize("packed", [False, True])
def test_compile_only_batches_are_the_pipelines_batches(packed):
    """The shapes a --compile_topology run compiles for without reading data are those of
    the batches the real pipelines build (LM and translation, train and eval)."""
    from absl import flags

    from tfx_jax.apps.language_model import pipeline
    from tfx_jax.data import text_pipeline
    flags.FLAGS.mark_as_parsed()  # Grain reads absl flags
    texts = ["abcde", "fgh", "ijklmn", "op", "qrstu", "vw"]
    lm_features = {key: ((16,), "int32") for key in pipeline.LENGTHS_KEYS}
    lm_train = next(pipeline.train_batches(texts, _Chars(), global_batch_size=2, max_len=16,
                                           packing_enabled=packed))
    assert _structure(lm_train) == _structure(tr.abstract_batch(2, lm_features, packed=packed))
    windows = pipeline.eval_windows(texts, _Chars(), max_len=16)
    lm_eval = next(iter(pipeline.eval_batches(windows, global_batch_size=2, max_len=16)))
    assert _structure(lm_eval) == _structure(tr.abstract_batch(2, lm_features))

    pairs = [(t, t[::-1] + "x") for t in texts]
    mt_features = {"inputs": ((10,), "int32"), "targets": ((12,), "int32")}
    mt_train = next(text_pipeline.train_batches(pairs, _Chars(), global_batch_size=2,
                                                max_source_length=10, max_target_length=12,
                                                packing=packed))
    assert _structure(mt_train) == _structure(tr.abstract_batch(2, mt_features, packed=packed))
    mt_eval = next(iter(text_pipeline.eval_batches(pairs, _Chars(), global_batch_size=2,
                                                   max_source_length=10,
                                                   max_target_length=12).batches))
    assert _structure(mt_eval) == _structure(tr.abstract_batch(2, mt_features))


@pytest.mark.slow
def test_lm_compiles_a_checkpoints_config_json_alone_and_reports_model_flops(tmp_path):
    """A fine-tuning run's fit is checked from the checkpoint's config.json alone (no
    weights, no tokenizer, no corpus: the dataset does not exist); every CausalLMConfig
    field is a config.model key; for the scanned stack XLA's cost analysis counts one
    layer: the roofline takes the model's FLOPs and no MFU ceiling is claimed."""
    from tfx_jax.lm import CausalLMConfig
    from tfx_jax.pretrained.hf_decoders import config_to_hf
    cfg = CausalLMConfig.preset("llama3.2-1b", num_layers=6, d_model=64, num_heads=4,
                                num_kv_heads=2, head_dim=16, d_ff=128, vocab_size=512)
    checkpoint = tmp_path / "llama"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    done = _script("lm", tmp_path / "run", "--compile_topology=v5e:2x2",
                   f"--config.init_from={checkpoint}", "--config.finetune=lora",
                   f"--config.dataset={tmp_path / 'no_such_corpus'}", "--config.max_len=256",
                   "--config.batch_size=8", "--config.eval_batch_size=8",
                   "--config.model.scan_layers=True", "--config.model.remat_policy=full")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "compile" / "v5e_2x2.json").read_text())
    assert report["fits"] and report["cost_counts_one_layer"] and report["mfu_ceiling"] is None
    peak = report["peak_flops_per_chip"] * report["chips"]
    assert report["roofline_step_s"] >= report["model_flops_per_step"] / peak
    # LoRA: Adam moments for the adapters only (full fine-tuning: 3x the parameters)
    assert report["state_bytes_per_chip"] < report["params_bytes_per_chip"] * 2
    assert "no data is read" in done.stderr
    done = _script("lm", tmp_path / "gpt", "--compile_topology=v5e:2x2", *LM_FLAGS,
                   "--config.model.fused_qkv=True", "--config.model.num_heads=2",
                   f"--config.dataset={tmp_path / 'no_such_corpus'}")
    assert done.returncode == 0, done.stderr[-2000:]


def test_remat_search_finds_each_policys_largest_batch_and_reports_the_best(monkeypatch,
                                                                            tmp_path):
    """--compile_search=batch_size,remat_policy: one batch search per remat policy (the
    app's task rebuilt with it), the report of the policy with the largest batch, each
    policy's batch in ``search_by_remat``; against a stand-in compiler."""
    limits = {"none": 8, "full": 40, "full_nested": 36, "dots": 16, "dots_no_batch": 24}
    tasks = {policy: tr.Task(init_params=lambda rng: {}, loss_fn=lambda *a: 0.0)
             for policy in limits}

    def compile_task(task, optimizer, schedule, mesh, batch, **_):
        policy = next(p for p, t in tasks.items() if t is task)
        rows = jax.tree.leaves(batch)[0].shape[0]
        return {"fits": rows <= limits[policy], "peak_bytes_per_chip": rows, "policy": policy}

    monkeypatch.setattr(topology, "compile_task", compile_task)
    monkeypatch.setattr(topology, "format_report", lambda report: "")
    with tr.compiling_for(V5E, search="batch_size,remat_policy"):
        mesh = tr.make_mesh({"data": 4})
        with pytest.raises(topology.Compiled) as done:
            topology.compile_plan(tr.default_config(), str(tmp_path), tasks["none"], mesh,
                                  {"x": _tokens((8, 16))}, with_remat=tasks.__getitem__)
    report = done.value.report
    assert report["remat_policy"] == "full" and report["policy"] == "full"
    assert {p: r["batch_size"] for p, r in report["search_by_remat"].items()} == limits
    assert json.loads((tmp_path / "compile" / "v5e_2x2.json").read_text())["remat_policy"] \
        == "full"
