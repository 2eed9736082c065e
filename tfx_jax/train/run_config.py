"""The training loop's config keys, their defaults, and their validation.

Experiment configs start from :func:`default_config` and extend it (model
sizes, data files, label smoothing, ...); the loop reads only the keys listed
here and ignores the rest. Keys and meanings:

=========================  =============  ============================================
key                        default        meaning
=========================  =============  ============================================
seed                       0              PRNG seed for parameter init and dropout
batch_size                 64             global batch per step (all hosts together)
num_train_steps            100_000        train steps (= batches) to run
learning_rate              1e-3           peak rate ("warmup_cosine", "constant");
                                          a multiplier for "transformer" (paper = 1.0)
schedule                   warmup_cosine  "transformer" | "warmup_cosine" | "constant"
warmup_steps               4000           linear warm-up length in optimizer updates
schedule_d_model           512            d_model in the "transformer" schedule
end_learning_rate          0.0            final rate of "warmup_cosine"
optimizer                  adam           "adam" | "adamw"
b1, b2, eps                0.9/0.98/1e-9  Adam moments (paper, sec. 5.3)
weight_decay               0.0            decoupled weight decay ("adamw" only)
grad_clip_norm             0.0            clip to this global norm; 0 = off
grad_accum_steps           1              batches per optimizer update (optax.MultiSteps)
log_every_steps            100            train metrics line every N steps
eval_every_steps           1000           evaluation every N steps (0 = only at the end)
checkpoint_every_steps     1000           checkpoint every N steps (0 = only at the end)
max_checkpoints_to_keep    3              older checkpoints are deleted
async_checkpointing        True           write checkpoints in the background
skip_nonfinite_updates     False          skip non-finite steps instead of stopping
progress_bar               True           tqdm bar (only on process 0 and a TTY)
best_metric                "loss"         eval metric that ranks checkpoints: the best
                                          one is kept besides the latest N ("" = off)
best_metric_mode           "min"          "min" (loss) or "max" (accuracy, bleu, ...)
early_stopping_patience    0              stop after N evals without a new best
                                          best_metric (0 = off)
early_stopping_min_delta   0.0            smaller improvements do not count
peak_tflops                0.0            peak TFLOP/s per device for ``mfu``; 0 = by
                                          device kind (``train/perf.py``; CPU: no mfu)
profile_steps              ""             jax.profiler trace into <workdir>/profile:
                                          "FIRST,LAST" steps or a count; "" = off
mesh.data                  -1             data-parallel axis (-1: the remaining devices)
mesh.fsdp                  1              FSDP axis: splits params/optimizer state
mesh.context               1              context axis: splits the sequence (> 1:
                                          context-parallel attention)
mesh.tensor                1              tensor-parallel axis (heads, MLP, vocab)
=========================  =============  ============================================

Training holds ``<workdir>/.lock`` (:mod:`tfx_jax.train.checkpoint`), so a
second run on the same workdir stops at once naming the first.

``config.mesh`` shapes the device mesh (``tfx_jax.train.make_mesh``):
``data x fsdp x context x tensor`` must equal the number of devices (one axis may be
-1), e.g. ``--config.mesh.fsdp=4``. The default is pure data parallelism.

With ``grad_accum_steps = k`` one *step* is still one batch of ``batch_size``
examples; the optimizer updates every ``k`` steps (effective batch
``k * batch_size``) and schedules count optimizer updates, so
``num_train_steps`` must be a multiple of ``k``.

:func:`train` keeps the run's whole config (experiment keys too) as
``<workdir>/config.json`` (:func:`save_config`), so inference commands rebuild
the model that wrote the checkpoints with :func:`load_config`.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import jax
import ml_collections
from etils import epath

from tfx_jax.errors import (WorkdirError, WorkdirNotFound, is_int, is_number, require,
                            require_key)
from tfx_jax.train.mesh import MESH_AXES
from tfx_jax.train.perf import parse_profile_steps

CONFIG_FILE = "config.json"
JOB_KEY = "job"  # which script's run a workdir holds (written into config.json)
# A key only that job's config has: names the job of a workdir whose config.json has no "job".
JOB_SIGNATURES = {"translate": "max_source_length", "lm": "sample_prompts",
                  "dalle": "image_tokenizer", "vit": "eval_every_epochs"}

SCHEDULES = ("transformer", "warmup_cosine", "constant")
OPTIMIZERS = ("adam", "adamw")


def default_config() -> ml_collections.ConfigDict:
    """The defaults for every key the training loop reads (see module docstring)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.batch_size = 64
    config.num_train_steps = 100_000
    config.learning_rate = 1e-3
    config.schedule = "warmup_cosine"
    config.warmup_steps = 4000
    config.schedule_d_model = 512
    config.end_learning_rate = 0.0
    config.optimizer = "adam"
    config.b1 = 0.9
    config.b2 = 0.98
    config.eps = 1e-9
    config.weight_decay = 0.0
    config.grad_clip_norm = 0.0
    config.grad_accum_steps = 1
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.max_checkpoints_to_keep = 3
    config.async_checkpointing = True
    config.skip_nonfinite_updates = False
    config.progress_bar = True
    config.best_metric = "loss"
    config.best_metric_mode = "min"
    config.early_stopping_patience = 0
    config.early_stopping_min_delta = 0.0
    config.peak_tflops = 0.0
    config.profile_steps = ""
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "context": 1, "tensor": 1})
    return config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key that is missing or out of range."""
    missing = [key for key in default_config() if key not in config]
    require(not missing, f"config is missing the training keys {missing}; start experiment "
            f"configs from tfx_jax.train.default_config()")
    for key in ("batch_size", "num_train_steps", "grad_accum_steps", "max_checkpoints_to_keep",
                "schedule_d_model", "log_every_steps"):
        require_key(config, key, is_int(config[key]) and config[key] > 0, "a positive integer")
    for key in ("warmup_steps", "eval_every_steps", "checkpoint_every_steps", "seed",
                "early_stopping_patience"):
        require_key(config, key, is_int(config[key]) and config[key] >= 0,
                    "a non-negative integer")
    require_key(config, "schedule", config.schedule in SCHEDULES, f"one of {SCHEDULES}")
    require_key(config, "optimizer", config.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}")
    for key in ("learning_rate", "eps"):
        require_key(config, key, is_number(config[key]) and config[key] > 0,
                    "a positive number")
    require_key(config, "best_metric", isinstance(config.best_metric, str),
                "an eval metric name or '' (off)")
    require_key(config, "best_metric_mode", config.best_metric_mode in ("min", "max"),
                "'min' or 'max'")
    require(not (config.early_stopping_patience and not config.best_metric),
            f"config.early_stopping_patience = {config.early_stopping_patience} needs "
            f"config.best_metric (the eval metric to watch), got ''")
    for key in ("end_learning_rate", "weight_decay", "grad_clip_norm", "early_stopping_min_delta",
                "peak_tflops"):
        require_key(config, key, is_number(config[key]) and config[key] >= 0,
                    "a non-negative number (0 = off)")
    for key in ("b1", "b2"):
        require_key(config, key, is_number(config[key]) and 0 <= config[key] < 1, "in [0, 1)")
    parse_profile_steps(config.profile_steps, start_step=0)  # a bad window fails here, not later
    require(not (config.weight_decay > 0 and config.optimizer != "adamw"),
            f"config.weight_decay = {config.weight_decay} needs config.optimizer = 'adamw' "
            f"(plain Adam has no decoupled weight decay), got {config.optimizer!r}")
    check_train_length(config)
    _validate_mesh(config)
    if config.schedule == "transformer":
        require_key(config, "warmup_steps", config.warmup_steps > 0,
                    "positive for the 'transformer' schedule")


def _validate_mesh(config) -> None:
    mesh = config.mesh
    require(hasattr(mesh, "items"), f"config.mesh must be a mapping like {{'data': -1, "
            f"'fsdp': 1, 'tensor': 1}}, got {mesh!r}")
    unknown = sorted(set(mesh.keys()) - set(MESH_AXES))
    require(not unknown, f"config.mesh has unknown axis name(s) {unknown}; the mesh axes are "
            f"{list(MESH_AXES)}")
    for axis, size in mesh.items():
        require(is_int(size) and (size > 0 or size == -1), f"config.mesh.{axis} must be a "
                f"positive integer or -1 (the remaining devices), got {size!r}")
    require(list(mesh.values()).count(-1) <= 1,
            f"config.mesh = {dict(mesh)}: at most one axis may be -1")


def freeze(config: ml_collections.ConfigDict, job: str,
           **decided) -> ml_collections.FrozenConfigDict:
    """The run's plan: an immutable copy of the checked ``config`` plus what the data decided.

    ``decided`` holds the keys the data fixed (row lengths, training steps, image
    shape, ...), dotted keys for sections (``**{"model.image_size": 224}``); the
    user's ``config`` itself is left as it was. ``job`` ("translate", "lm",
    "vit", "dalle") is kept as ``config.json``'s ``job``, so a workdir names the
    script that made it. :func:`tfx_jax.train.train` does not validate a plan
    again: its app checked the config before reading data, and the keys the
    data decided are checked here (:func:`check_train_length`).
    """
    plan = config.copy_and_resolve_references()
    with plan.unlocked():
        plan[JOB_KEY] = job
        for key, value in decided.items():
            *parents, leaf = key.split(".")
            section = plan
            for parent in parents:
                section = section[parent]
            section[leaf] = value
    if "num_train_steps" in decided or "eval_every_steps" in decided:
        check_train_length(plan)
    return ml_collections.FrozenConfigDict(plan)


def is_plan(config) -> bool:
    """Whether ``config`` is a plan from :func:`freeze` (checked, immutable)."""
    return isinstance(config, ml_collections.FrozenConfigDict)


def check_train_length(config) -> None:
    """The keys a run may take from its data: steps against accumulation and warm-up."""
    require_key(config, "num_train_steps",
                is_int(config.num_train_steps) and config.num_train_steps > 0,
                "a positive integer")
    require_key(config, "eval_every_steps",
                is_int(config.eval_every_steps) and config.eval_every_steps >= 0,
                "a non-negative integer")
    require_key(config, "num_train_steps", config.num_train_steps % config.grad_accum_steps == 0,
                f"a multiple of config.grad_accum_steps = {config.grad_accum_steps}")
    num_updates = config.num_train_steps // config.grad_accum_steps
    if config.schedule == "warmup_cosine":
        require_key(config, "warmup_steps", config.warmup_steps < num_updates,
                    f"smaller than the number of optimizer updates ({num_updates}) for the "
                    f"'warmup_cosine' schedule")


def script_of(job: str) -> str:
    return f"experiments/{job}.py"


def job_of(stored: ml_collections.ConfigDict) -> Optional[str]:
    """The job a stored config.json belongs to ("job", else its signature key), or None."""
    if stored.get(JOB_KEY):
        return stored[JOB_KEY]
    return next((job for job, key in JOB_SIGNATURES.items() if key in stored), None)


def check_workdir(workdir: str, job: str, config=None, *, same: Sequence[str] = ()) -> None:
    """WorkdirError for a workdir another script made, or (``same``) one trained on other data.

    Reads ``<workdir>/config.json`` if there is one. A workdir of another job is
    refused naming its script; with ``config``, a workdir that holds a
    checkpoint and was trained with other values of the ``same`` keys (the
    dataset, the tokenizer) is refused instead of resumed with the old data's
    tokenizer and rewritten.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return
    stored = ml_collections.ConfigDict(json.loads(path.read_text()))
    made_by = job_of(stored)
    require(made_by in (None, job), f"workdir {workdir!r} holds a run of {script_of(made_by)} "
            f"(config.json), not of {script_of(job)}; use a workdir of {script_of(job)} or a "
            f"new --workdir", WorkdirError)
    if config is None or not same:
        return
    checkpoints = epath.Path(workdir) / "checkpoints"
    if not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        return
    for key in same:
        before, now = stored.get(key), config.get(key)
        before = tuple(before) if isinstance(before, list) else before
        now = tuple(now) if isinstance(now, list) else now
        require(before == now, f"workdir {workdir!r} was trained with config.{key} = "
                f"{before!r}, this run has {now!r}; resuming would continue with the old "
                f"data's tokenizer and rewrite config.json: use a new --workdir, or "
                f"--config.{key}={before} to resume", WorkdirError)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config`` as ``<workdir>/config.json`` (process 0 only; gs:// works)."""
    if jax.process_index() != 0:
        return
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(
        config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def load_config(workdir: str, *, script: str | None = None,
                job: str | None = None) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was trained with (see :func:`save_config`).

    JSON has no tuples: sequence values come back as lists. Without one,
    :class:`tfx_jax.errors.WorkdirNotFound`; ``script`` names the script that
    trains such a workdir. With ``job``, a workdir of another job is a
    :class:`tfx_jax.errors.WorkdirError` naming the script that made it.
    """
    if job is not None:
        script = script or script_of(job)
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        if script:
            raise WorkdirNotFound(f"no trained model in workdir {workdir!r} (no "
                                    f"{CONFIG_FILE}); train one first with `python {script} "
                                    f"--workdir={workdir}`")
        raise WorkdirNotFound(
            f"no {CONFIG_FILE} in workdir {workdir!r}: is it a training run's --workdir?")
    stored = ml_collections.ConfigDict(json.loads(path.read_text()))
    if job is not None:
        check_workdir(workdir, job)
    return stored
