"""Task-agnostic training: mesh, optimizer, compiled step, checkpoints, metrics, loop.

An experiment supplies a :class:`Task` (``init_params``, ``loss_fn``, optional
``evaluate``), a config extending :func:`default_config` and a checkpointable
data iterator, and calls :func:`train`. See docs/training.md and docs/ARCHITECTURE.md.

  run_config.py   run options: default_config, validate_config, config.json save/load
  task.py         the Task contract between an app and the loop
  launch.py       one entry point for scripts: flags, multi-host start, exit codes
  mesh.py         the device mesh and sharding of process-local batches
  optimizers.py   Adam / AdamW with clipping and gradient accumulation
  schedules.py    learning-rate schedules (the paper's eq. 3, warmup-cosine, constant)
  losses.py       label-smoothed cross-entropies and accuracies
  state.py        the train state pytree and its abstract (shape-only) twin
  step.py         the jit-compiled train and eval steps
  checkpoint.py   Orbax checkpoints of state + data iterator; restore_params for inference
  metrics.py      metrics.jsonl and TensorBoard (event_files.py: event files on gs://)
  preemption.py   SIGTERM -> checkpoint now and exit
  progress.py     the progress bar and the final summary table
  loop.py         train(): the loop that ties these together
"""
from tfx_jax.train.checkpoint import Checkpointer, restore_params
from tfx_jax.train import launch
from tfx_jax.train.run_config import default_config, load_config, save_config, validate_config
from tfx_jax.train.losses import (classification_accuracy, classification_cross_entropy,
                                  token_accuracy, token_cross_entropy)
from tfx_jax.train.loop import NonFiniteError, TrainResult, train
from tfx_jax.train.mesh import (DATA_AXIS, batch_sharding, check_batch_size,
                                initialize_distributed, make_data_mesh, make_mesh,
                                replicated_sharding, shard_batch)
from tfx_jax.train.partitioning import RULES, param_shardings
from tfx_jax.train.metrics import MetricsWriter, average_metrics, read_metrics
from tfx_jax.train.optimizers import create_optimizer
from tfx_jax.train.preemption import Preempted, PreemptionWatcher
from tfx_jax.train.schedules import create_learning_rate_schedule, transformer_schedule
from tfx_jax.train.state import (TrainState, abstract_train_state, create_sharded_train_state,
                                 create_train_state, train_state_shardings)
from tfx_jax.train.step import make_eval_step, make_train_step
from tfx_jax.train.task import Task
from tfx_jax.train.topology import compile_target, compile_task, compiling_for, parse_target

__all__ = [
    "Checkpointer", "DATA_AXIS", "launch", "MetricsWriter", "NonFiniteError", "Preempted",
    "PreemptionWatcher", "Task", "TrainResult", "TrainState", "abstract_train_state",
    "average_metrics",
    "batch_sharding", "check_batch_size", "classification_accuracy",
    "classification_cross_entropy", "create_learning_rate_schedule", "create_optimizer",
    "create_train_state", "default_config", "initialize_distributed", "load_config",
    "make_data_mesh", "make_eval_step", "make_mesh", "RULES", "param_shardings",
    "create_sharded_train_state", "train_state_shardings", "make_train_step", "read_metrics", "replicated_sharding",
    "restore_params", "save_config", "shard_batch",
    "token_accuracy", "token_cross_entropy", "train", "transformer_schedule", "validate_config",
    "compile_target", "compile_task", "compiling_for", "parse_target",
]
