r"""Real (non-pad) tokens per second with and without packing, side by side.

Two jobs, each trained through the library's ``train()`` with its real input
pipeline, once with ``packing=False`` and once with ``packing=True``, in one
process, alternating (off, on, off, on, ... ``--rounds`` times) so that a
change of machine load hits both alike:

* ``translate``: the translation main job -- experiments/configs/translate.py's
  model and rows on the built-in number_words data (English -> German number
  words), SentencePiece vocabulary as the script trains it;
* ``translate_lists``: the same translation job on a corpus whose lengths
  spread like sentence lengths (lists of 1, 2, ... numbers per line, mostly
  short, a few long: experiments/make_number_lists_tsv.py, 20,000 pairs),
  rows sized from the data as the script does for a user's TSV;
* ``lm``: the LM job -- experiments/configs/lm.py's model and rows on the
  built-in corpus (the Python standard library's source).

Reported per job: the padding fraction of the train rows without / with
packing, and ``tokens_per_sec`` / ``steps_per_sec`` from metrics.jsonl,
the median over the timed windows (all metrics lines after the first, whose
window holds the compilation) of all rounds. ``gain`` is packed / unpacked
real tokens per second (the issue's target: >= 1.5).

    python experiments/packing_throughput.py                 # all jobs, CPU: minutes
    python experiments/packing_throughput.py --jobs=lm --steps=60

Writes benchmarks/results/packing_throughput_<platform>_<date>.json and .csv.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import statistics
import sys
import tempfile

import tensorflow_datasets as tfds
from absl import app, flags, logging

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import grain  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402

from tfx_jax import train as tr  # noqa: E402
from tfx_jax.apps import language_model as lm_app  # noqa: E402
from tfx_jax.apps.translation import transformer_config, translation_task  # noqa: E402
from tfx_jax.apps.translation.experiment import decide_sizes  # noqa: E402
from tfx_jax.data import packing  # noqa: E402
from tfx_jax.data.text_pairs import open_text_pairs  # noqa: E402
from tfx_jax.data.length_caps import length_caps  # noqa: E402
from tfx_jax.data.number_lists import number_list_pairs  # noqa: E402
from tfx_jax.data.text_pipeline import train_batches as translation_batches  # noqa: E402
from tfx_jax.data.tokenizer import load_or_train_tokenizer  # noqa: E402
from tfx_jax.lm import CausalLM  # noqa: E402
from tfx_jax.train.metrics import write_results  # noqa: E402

FLAGS = flags.FLAGS


def default_config(name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of experiments/configs/<name>.py, the scripts' default config."""
    path = os.path.join(_REPO_ROOT, "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


flags.DEFINE_list("jobs", ["translate", "translate_lists", "lm"],
                  "Jobs to measure: translate, translate_lists, lm.")
flags.DEFINE_integer("steps", 30, "Train steps per run (metrics every steps / 3).")
flags.DEFINE_integer("rounds", 1, "Alternations of (packing off, packing on) per job.")
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "tfx_jax_packing_tfds"),
                    "TFDS data_dir for number_words (generated on first use).")
flags.DEFINE_string("out_dir", os.path.join(_REPO_ROOT, "benchmarks", "results"),
                    "Where the JSON and CSV go.")
flags.DEFINE_string("out_name", None, "File name stem (default packing_throughput_<platform>_"
                    "<date>).")


def _run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.update(num_train_steps=FLAGS.steps, log_every_steps=max(FLAGS.steps // 3, 1),
                  eval_every_steps=0, checkpoint_every_steps=0, progress_bar=False,
                  warmup_steps=min(config.warmup_steps, FLAGS.steps // 2),
                  async_checkpointing=False)
    return config


def _translation_job(workdir: str, pairs, name: str):
    """(config, task, make_batches(packing), keys, description): translate.py's model and
    rows (lengths from the data, as the script measures them) on ``pairs``."""
    config = default_config("translate")  # its number_words model size ("tiny"), on any pairs
    config = tr.freeze(config, "translate", **decide_sizes(config, 0, user_corpus=False)[0])
    config = _run_config(config.as_configdict())
    tokenizer = load_or_train_tokenizer(pairs, workdir, vocab_size=config.vocab_size,
                                        model_type=config.tokenizer_type,
                                        split_digits=config.split_digits, seed=config.seed)
    caps = length_caps(pairs, tokenizer, percentile=config.length_percentile,
                       outlier_factor=config.outlier_factor, seed=config.seed)
    source, target = caps.max_source_length, caps.max_target_length
    config.update(max_source_length=source, max_target_length=target)
    model = transformer_config(config.model, vocab_size=tokenizer.vocab_size,
                               max_len=max(source, target))
    task = translation_task(model, max_source_length=source, max_target_length=target,
                            label_smoothing=config.label_smoothing)

    def make_batches(packed: bool):
        return translation_batches(pairs, tokenizer, global_batch_size=config.batch_size,
                                   max_source_length=source, max_target_length=target,
                                   seed=config.seed, packing=packed,
                                   read_options=grain.ReadOptions(num_threads=0))

    return config, task, make_batches, ("inputs", "targets"), (
        f"{name}, {len(pairs)} train pairs, rows {source}/{target}")


def translate_job(workdir: str):
    config = default_config("translate")
    pairs = open_text_pairs(config.dataset, "train", data_dir=FLAGS.data_dir, in_memory=True)
    return _translation_job(workdir, pairs, "number_words en->de")


def translate_lists_job(workdir: str):
    pairs = number_list_pairs(20_000, seed=0)
    return _translation_job(workdir, pairs, "number lists en->de (make_number_lists_tsv.py)")


def lm_job(workdir: str):
    """(config, task, make_batches(packing), keys) of the LM job."""
    config = _run_config(default_config("lm"))
    corpus = lm_app.open_corpus(config.dataset, eval_fraction=config.eval_fraction)
    tokenizer = lm_app.load_or_train_lm_tokenizer(corpus.train, workdir,
                                                  vocab_size=config.vocab_size,
                                                  max_chars=config.tokenizer_max_chars)
    model = CausalLM(lm_app.lm_config(config.model, vocab_size=tokenizer.vocab_size,
                                      max_len=config.max_len))
    task = lm_app.lm_task(model.config, max_len=config.max_len)

    def make_batches(packed: bool):
        return lm_app.train_batches(corpus.train, tokenizer, global_batch_size=config.batch_size,
                                    max_len=config.max_len, seed=config.seed,
                                    packing_enabled=packed)

    return config, task, make_batches, ("targets",), (
        f"{corpus.description}; rows of {config.max_len}")


JOBS = {"translate": translate_job, "translate_lists": translate_lists_job, "lm": lm_job}


def measure(name: str, root: str) -> list[dict]:
    config, task, make_batches, keys, description = JOBS[name](os.path.join(root, name))
    choice = packing.choose_packing(True, make_batches, keys, num_batches=8)
    unpacked_pad, packed_pad = choice.padding_unpacked, choice.padding_packed
    print(f"{name}: {description}\n  " + packing.padding_report(name, unpacked_pad, packed_pad),
          flush=True)
    windows = {False: [], True: []}
    for round_index in range(FLAGS.rounds):
        for packed in (False, True):
            workdir = os.path.join(root, f"{name}_{packed}_{round_index}")
            run_config = ml_collections.ConfigDict(config.to_dict())
            run_config.packing = str(packed).lower()
            tr.train(run_config, workdir, task, make_batches(packed),
                     mesh=tr.make_data_mesh(jax.devices()[:1]))
            windows[packed] += tr.read_metrics(workdir, "train")[1:]  # first: compilation
    records = []
    for packed in (False, True):
        records.append({
            "job": name, "packing": packed, "description": description,
            "padding_fraction": packed_pad if packed else unpacked_pad,
            "tokens_per_sec": statistics.median(w["tokens_per_sec"] for w in windows[packed]),
            "examples_per_sec": statistics.median(w["examples_per_sec"]
                                                  for w in windows[packed]),
            "steps_per_sec": statistics.median(w["steps_per_sec"] for w in windows[packed]),
            "windows": len(windows[packed]), "batch_size": config.batch_size,
            "steps_per_run": FLAGS.steps, "rounds": FLAGS.rounds})
    gain = records[1]["tokens_per_sec"] / records[0]["tokens_per_sec"]
    for record in records:
        record["gain"] = gain
    return records


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    tfds.disable_progress_bar()
    unknown = [job for job in FLAGS.jobs if job not in JOBS]
    if unknown or not FLAGS.jobs:
        raise app.UsageError(f"--jobs must name some of {sorted(JOBS)}, got {FLAGS.jobs}")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        records = [r for job in FLAGS.jobs for r in measure(job, root)]
    device = jax.devices()[0]
    meta = {"device_kind": device.device_kind, "platform": device.platform,
            "cpu_count": os.cpu_count(), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "jax": jax.__version__,
            "python": sys.version.split()[0],
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "experiments/packing_throughput.py", *sys.argv[1:]])}
    print(f"\n{device.device_kind}, load average {load_before[0]:.1f} -> "
          f"{meta['load_average_after'][0]:.1f}")
    print(f"{'job':<16} {'packing':<8} {'padding':>8} {'steps/s':>8} {'examples/s':>11} "
          f"{'real tokens/s':>14} {'gain':>6}")
    for r in records:
        print(f"{r['job']:<16} {str(r['packing']):<8} {r['padding_fraction']:>8.1%} "
              f"{r['steps_per_sec']:>8.3f} {r['examples_per_sec']:>11.1f} "
              f"{r['tokens_per_sec']:>14,.0f} {r['gain'] if r['packing'] else 1.0:>5.2f}x")
    name = FLAGS.out_name or f"packing_throughput_{device.platform}_{meta['date'][:10]}"
    print("wrote", *write_results(FLAGS.out_dir, name, meta, records, {"date": meta["date"]}))

if __name__ == "__main__":
    app.run(main)
