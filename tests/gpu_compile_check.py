"""Deviceless H100 compile checks: a second CI step, not part of the default suite.

It needs JAX's CUDA plugin (``pip install "jax[cuda12]"``, about 5.5 GB), so it runs in
its own environment, on a CPU machine, with ``JAX_PLATFORMS=cpu``:

    JAX_PLATFORMS=cpu python tests/gpu_compile_check.py

The CausalLM's train and eval steps compiled for ``h100:8`` resolve attention "auto" to
cuDNN and hold its fused-attention calls (forward, and backward in the train step), on
a data x tensor mesh and with grouped-query attention; packed rows (segment ids, which
jax's cuDNN wrapper cannot take) go to "chunked" and hold none. ViT-B/16 compiles (XLA
finds no Triton GEMM tiles for one of its shapes without a GPU: cuBLAS GEMMs then) and
fits. Exits 1 on a mismatch.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import tfx_jax as tfx  # noqa: E402
from tfx_jax import train as tr  # noqa: E402
from tfx_jax.apps.classification.task import classification_task  # noqa: E402
from tfx_jax.apps.language_model.task import lm_task  # noqa: E402


def lm(**changes):
    return lm_task(tfx.CausalLMConfig(**{**dict(
        vocab_size=64, max_len=256, num_layers=1, d_model=64, num_heads=4, d_ff=128,
        dtype=jnp.bfloat16), **changes}), max_len=256)


def main() -> int:
    tokens = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batch = {"inputs": tokens((8, 256)), "targets": tokens((8, 256))}
    packed = {**batch, "inputs_segmentation": tokens((8, 256)),
              "inputs_position": tokens((8, 256))}
    cases = [("data 4 x tensor 2", lm(), batch, {"data": 4, "tensor": 2}, (2, 1)),
             ("grouped-query", lm(num_kv_heads=2), batch, {"data": 8}, (2, 1)),
             ("packed rows -> chunked", lm(), packed, {"data": 8}, (0, 0))]
    failures = 0
    for name, task, batch, mesh_config, (train_calls, eval_calls) in cases:
        with tr.compiling_for(tr.parse_target("h100:8")):
            mesh = tr.make_mesh(mesh_config)
            report = tr.compile_task(task, optax.adamw(1e-3), optax.constant_schedule(1e-3),
                                     mesh, batch, eval_batch=batch)
        got = tuple(report["steps"][s]["custom_calls"]["cudnn"] for s in ("train", "eval"))
        ok = (got == (train_calls, eval_calls) and report["fits"]
              and report["device_kind"] == "NVIDIA H100 80GB HBM3" and report["chips"] == 8)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: cuDNN calls train/eval {got}, expected "
              f"{(train_calls, eval_calls)}; compiled in {report['compile_s']:.1f} s")
    # ViT-B/16 at 224 (197 tokens): without a GPU to tune on, XLA finds no Triton tiles for
    # its [64 x 197, 768] projection; compile_step compiles it again with cuBLAS GEMMs
    vit = classification_task(tfx.ViTConfig.preset("B/16", num_classes=1000,
                                                    dtype=jnp.bfloat16, scan_layers=True))
    images = {"image": jax.ShapeDtypeStruct((512, 224, 224, 3), jnp.float32),
              "label": tokens((512,)), "valid": jax.ShapeDtypeStruct((512,), jnp.bool_)}
    with tr.compiling_for(tr.parse_target("h100:8")):
        report = tr.compile_task(vit, optax.adamw(1e-3), optax.constant_schedule(1e-3),
                                 tr.make_mesh({"data": 8}), images, eval_batch=images)
    options = report["steps"]["train"]["compiler_options"]
    ok = report["fits"] and options in ({}, tr.topology.CUBLAS_GEMMS)
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} ViT-B/16, 64 images per GPU: peak "
          f"{report['peak_bytes_per_chip'] / 2 ** 30:.2f} GiB, compiled with "
          f"{options or 'default options'} in {report['compile_s']:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
