"""Task-agnostic training: mesh, optimizer, compiled step, checkpoints, metrics, loop.

An experiment supplies a :class:`Task` (``init_params``, ``loss_fn``, optional
``evaluate``), a config extending :func:`default_config` and a checkpointable
data iterator, and calls :func:`train`. See docs/training.md.
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
]
