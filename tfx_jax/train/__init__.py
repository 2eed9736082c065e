"""Task-agnostic training: mesh, optimizer, compiled step, checkpoints, metrics, loop.

An experiment supplies a :class:`Task` (``init_params``, ``loss_fn``, optional
``evaluate``), a config extending :func:`default_config` and a checkpointable
data iterator, and calls :func:`train`. See docs/training.md and docs/ARCHITECTURE.md.

  run_config.py   run options: default_config, validate_config, config.json save/load
  launch.py       one entry point for scripts: flags, multi-host start, exit codes
  mesh.py         the device mesh, the one partitioning RULES table, batch sharding and sizes
  optim.py        optimizers (Adam/AdamW, clipping, accumulation), learning-rate schedules
                  (the paper's eq. 3, warmup-cosine, constant), losses and accuracies
  finetune.py     what to train: trainable-parameter masks, LoRA adapters, FineTuning
  state.py        the Task contract, the train state pytree (and its abstract twin), the
                  jit-compiled train and eval steps
  checkpoint.py   Orbax checkpoints of state + data iterator, per-array checksums, the
                  workdir lock; restore_params for inference
  metrics.py      metrics.jsonl, TensorBoard event files (also on gs://), the progress bar
                  and summary table, benchmark results files
  perf.py         FLOPs per step, throughput and MFU, memory estimates
  loop.py         train(): the loop that ties these together, early stopping, preemption
"""
from tfx_jax import lazy_attributes
from tfx_jax.train import launch
from tfx_jax.train.checkpoint import CheckpointWriteError, Checkpointer, restore_params
from tfx_jax.train.loop import (NonFiniteError, Preempted, PreemptionWatcher, TrainResult,
                                evaluate_batches, train)
from tfx_jax.train.mesh import (RULES, batch_sharding, check_batch_size, compile_target,
                                initialize_distributed, make_data_mesh, make_mesh, param_shardings,
                                replicated_sharding, rows_per_device, shard_batch)
from tfx_jax.train.metrics import MetricsWriter, average_metrics, read_metrics
from tfx_jax.train.optim import (chunked_token_losses, classification_accuracy,
                                 classification_cross_entropy, create_learning_rate_schedule, create_optimizer, token_accuracy,
                                 token_cross_entropy, transformer_schedule)
from tfx_jax.train.run_config import (check_workdir, default_config, freeze, load_config,
                                      save_config, validate_config)
from tfx_jax.train.state import (Task, TrainState, abstract_train_state, check_params_fit_mesh,
                                 create_sharded_train_state, create_train_state, make_eval_step,
                                 make_train_step, train_state_shardings)

# compiling for a chip this host lacks (``--compile_topology``): loaded on first use, so a
# training run never imports the compiler's module
_TOPOLOGY = ("abstract_batch", "compile_plan", "compile_task", "compiling_for", "parse_target")
__getattr__, __dir__ = lazy_attributes(__name__, dict.fromkeys(_TOPOLOGY, "topology"),
                                       ("topology",))

__all__ = [
    "CheckpointWriteError", "Checkpointer", "launch", "MetricsWriter", "NonFiniteError", "Preempted",
    "PreemptionWatcher", "Task", "TrainResult", "TrainState", "abstract_train_state",
    "average_metrics",
    "batch_sharding", "check_batch_size", "check_params_fit_mesh", "check_workdir",
    "chunked_token_losses", "classification_accuracy",
    "classification_cross_entropy", "create_learning_rate_schedule", "create_optimizer",
    "create_train_state", "default_config", "evaluate_batches", "freeze", "initialize_distributed", "load_config",
    "make_data_mesh", "make_eval_step", "make_mesh", "RULES", "param_shardings",
    "create_sharded_train_state", "train_state_shardings", "make_train_step", "read_metrics", "replicated_sharding", "rows_per_device",
    "restore_params", "save_config", "shard_batch",
    "token_accuracy", "token_cross_entropy", "train", "transformer_schedule", "validate_config",
    "abstract_batch", "compile_plan", "compile_target", "compile_task", "compiling_for",
    "parse_target",
]
