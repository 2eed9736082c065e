r"""The training library's step against a plain train step on the same model, side by side.

The library's compiled step (``tfx_jax.train.make_train_step``) does more than
a plain step: the non-finite guard, the gradient norm, the learning-rate and
loss metrics. This script measures what that costs. Both steps train the
same ViT with the same optimizer (``tr.create_optimizer``: AdamW with global
norm clipping, as experiments/configs/vit.py) on the same batch, with the
state donated:

* ``plain``: ``value_and_grad`` -> ``optimizer.update`` -> ``apply_updates``;
  returns only the new state (no guard, no metrics);
* ``library``: ``make_train_step`` (guard + metrics).

XLA's own numbers for each compiled step (``cost_analysis()["bytes
accessed"]``, ``memory_analysis().temp_size_in_bytes``) do not depend on the
machine's load: the ``bytes +`` column is the guard's extra memory traffic.
Two sizes: ``activations`` (batch 128, d_model 128: activations dominate, the
optimizer update is cheap) and ``parameters`` (batch 8, d_model 384: the
update of 4.7M parameters and their Adam moments matters).

Timing interleaves the two (plain, library, plain, library, ...) so that a
change in machine load hits both alike; each repeat is one step closed by
``jax.block_until_ready``; the table shows medians, and ``overhead`` is
``library / plain - 1`` (the target: <= 3%).

    python experiments/step_overhead.py                      # ViT on 28x28 images, CPU
    python experiments/step_overhead.py --presets=parameters --repeats=30

Writes benchmarks/results/step_overhead_<platform>_<date>.json and .csv.
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

from absl import app, flags

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import tfx_jax as tfx  # noqa: E402
from tfx_jax import train as tr  # noqa: E402
from tfx_jax.train.metrics import write_results  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["activations", "parameters"], "Model sizes to measure: "
                  f"{{'activations': batch 128, d_model 128 (activations dominate), "
                  f"'parameters': batch 8, d_model 384 (parameters dominate)}}.")
flags.DEFINE_integer("image_size", 28, "Image side (1 channel).")
flags.DEFINE_integer("patch_size", 4, "ViT patch side.")
flags.DEFINE_integer("num_layers", 4, "ViT layers.")
flags.DEFINE_integer("warmup", 3, "Untimed steps of each kind after compilation.")
flags.DEFINE_integer("repeats", 20, "Timed steps of each kind (interleaved).")
flags.DEFINE_string("out_dir", os.path.join(_REPO_ROOT, "benchmarks", "results"),
                    "Where the JSON and CSV go.")
flags.DEFINE_string("out_name", None, "File name stem (default step_overhead_<platform>_<date>).")


PRESETS = {"activations": dict(batch_size=128, d_model=128),
           "parameters": dict(batch_size=8, d_model=384)}


def build(batch_size: int, d_model: int, seed: int = 0):
    """(init_params, loss_fn, batch, config) of the ViT classification benchmark."""
    cfg = tfx.ViTConfig(image_size=FLAGS.image_size, patch_size=FLAGS.patch_size,
                        num_channels=1, num_classes=10, d_model=d_model,
                        num_heads=4, num_layers=FLAGS.num_layers, d_ff=2 * d_model,
                        dropout_rate=0.0)
    model = tfx.ViT(cfg)
    shape = (FLAGS.image_size, FLAGS.image_size, 1)

    def init_params(rng):
        return model.init({"params": rng}, jnp.zeros((1, *shape), jnp.float32))["params"]

    def loss_fn(params, batch, rng, train):
        logits = model.apply({"params": params}, batch["images"], deterministic=not train,
                             rngs={"dropout": rng})
        return tr.classification_cross_entropy(logits, batch["labels"],
                                               label_smoothing=0.1), {}

    rng = np.random.default_rng(seed)
    batch = {"images": rng.standard_normal((batch_size, *shape), dtype=np.float32),
             "labels": rng.integers(0, 10, size=batch_size, dtype=np.int32)}
    config = tr.default_config()
    config.update(batch_size=batch_size, optimizer="adamw", weight_decay=0.2,
                  b2=0.999, eps=1e-8, grad_clip_norm=1.0, learning_rate=2e-3,
                  warmup_steps=10, num_train_steps=1000, seed=seed)
    return init_params, loss_fn, batch, config


def make_plain_step(loss_fn, optimizer, mesh):
    """The textbook step: gradients, optimizer update, new state; nothing else."""

    def plain_step(state, batch):
        grads = jax.grad(lambda p: loss_fn(p, batch, state.step_rng(), True)[0])(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)

    replicated = tr.replicated_sharding(mesh)
    return jax.jit(plain_step, in_shardings=(replicated, tr.batch_sharding(mesh)),
                   out_shardings=replicated, donate_argnums=0)


def measure(preset: str) -> dict:
    mesh = tr.make_data_mesh(jax.devices()[:1])
    init_params, loss_fn, batch, config = build(**PRESETS[preset])
    optimizer, schedule = tr.create_optimizer(config)
    new_state = jax.jit(lambda: tr.create_train_state(init_params, optimizer, 0),
                        out_shardings=tr.replicated_sharding(mesh))
    steps = {"plain": make_plain_step(loss_fn, optimizer, mesh),
             "library": tr.make_train_step(loss_fn, optimizer, schedule, mesh)}
    batch = tr.shard_batch(batch, mesh)
    states, compile_s, costs = {}, {}, {}

    def run(name, state):  # one step, waited for; the library's also returns metrics
        out = jax.block_until_ready(steps[name](state, batch))
        return out[0] if isinstance(out, tuple) else out

    for name, step in steps.items():
        state = new_state()
        start = time.perf_counter()
        steps[name] = step.lower(state, batch).compile()
        compile_s[name] = time.perf_counter() - start
        costs[name] = (steps[name].cost_analysis().get("bytes accessed"),
                       steps[name].memory_analysis().temp_size_in_bytes)
        for _ in range(FLAGS.warmup):
            state = run(name, state)
        states[name] = state
    times = {name: [] for name in steps}
    for _ in range(FLAGS.repeats):
        for name in steps:
            start = time.perf_counter()
            states[name] = run(name, states[name])
            times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    same = bool(all(np.allclose(a, b, atol=1e-5) for a, b in zip(
        jax.tree.leaves(states["plain"].params), jax.tree.leaves(states["library"].params))))
    num_params = sum(x.size for x in jax.tree.leaves(states["plain"].params))
    records = []
    for name in steps:
        median = statistics.median(times[name])
        records.append({"preset": preset, "params_M": num_params / 1e6,
                        "batch_size": PRESETS[preset]["batch_size"], "step": name,
                        "median_ms": 1e3 * median, "min_ms": 1e3 * min(times[name]),
                        "mean_ms": 1e3 * statistics.fmean(times[name]),
                        "overhead": median / plain - 1,
                        "bytes_accessed_MB": costs[name][0] / 1e6,
                        "bytes_overhead": costs[name][0] / costs["plain"][0] - 1,
                        "temp_MB": costs[name][1] / 1e6, "compile_s": compile_s[name],
                        "repeats": FLAGS.repeats, "same_params_as_plain": same})
    return records


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    records = [r for preset in FLAGS.presets for r in measure(preset)]
    device = jax.devices()[0]
    meta = {"device_kind": device.device_kind, "platform": device.platform,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "jax": jax.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": f"ViT {FLAGS.image_size}x{FLAGS.image_size}/{FLAGS.patch_size}, "
                     f"{FLAGS.num_layers} layers, AdamW + clipping"}
    print(f"{meta['model']} on {device.device_kind} (load average {meta['load_average'][0]:.1f})")
    print(f"{'preset':<12} {'params':>7} {'step':<8} {'median ms':>10} {'min ms':>8} "
          f"{'overhead':>9} {'XLA bytes MB':>13} {'bytes +':>8} {'temp MB':>8} {'same':>5}")
    for r in records:
        print(f"{r['preset']:<12} {r['params_M']:>6.2f}M {r['step']:<8} {r['median_ms']:>10.2f} "
              f"{r['min_ms']:>8.2f} {r['overhead']:>9.1%} {r['bytes_accessed_MB']:>13.1f} "
              f"{r['bytes_overhead']:>8.1%} {r['temp_MB']:>8.1f} {str(r['same_params_as_plain']):>5}")
    name = FLAGS.out_name or f"step_overhead_{device.platform}_{meta['date'][:10]}"
    paths = write_results(FLAGS.out_dir, name, meta, records,
                          {"load_average_1m": meta["load_average"][0], "date": meta["date"]})
    print("wrote", *paths)

if __name__ == "__main__":
    app.run(main)
