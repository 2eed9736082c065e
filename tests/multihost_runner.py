"""One process of a multi-process run of the toy task, started the way users start scripts.

    python tests/multihost_runner.py --workdir=DIR --coordinator_address=127.0.0.1:PORT \
        --num_processes=2 --process_id=I [--config.num_train_steps=12] [--cache_dir=DIR]

It goes through ``tfx_jax.train.launch.run`` (flags, ``jax.distributed.initialize``,
exit code 143 on preemption) and ``tfx_jax.train.train``; each process reads only its
shard of the toy data (``examples[process_index::process_count]``). On CPU, JAX's
cross-process collectives are Gloo (``jax_cpu_collectives_implementation``); each
process gets ``--devices_per_process`` CPU devices. This file is also its own config
file (``get_config``), so ``--config.KEY=VALUE`` works as in the experiments.
"""
import os
import sys


def get_config():
    import train_toy as toy  # pylint: disable=import-outside-toplevel
    return toy.toy_config()


def fail_writes_of_step(step: int) -> None:
    """Files of ``step``'s save fail with ENOSPC in this process, at the layer Orbax writes
    through (``etils.epath``), so its background threads meet it as on a full disk."""
    import errno  # pylint: disable=import-outside-toplevel
    from etils.epath import gpath  # pylint: disable=import-outside-toplevel
    real = gpath._GPath.write_text  # pylint: disable=protected-access

    def write_text(self, *args, **kwargs):
        if f"{step}.orbax-checkpoint-tmp" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)
    gpath._GPath.write_text = write_text  # pylint: disable=protected-access


def refuse_probe_files() -> None:
    """The Checkpointer's probe file before each save fails with EROFS in this process."""
    import builtins  # pylint: disable=import-outside-toplevel
    import errno  # pylint: disable=import-outside-toplevel
    real = builtins.open

    def refusing_open(file, *args, **kwargs):
        if ".write_test.process_" in str(file):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real(file, *args, **kwargs)
    builtins.open = refusing_open


def main():
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_integer("devices_per_process", 4, "CPU devices in each process.")
    flags.DEFINE_string("cache_dir", None, "JAX persistent compilation cache.")
    flags.DEFINE_float("seconds_per_batch", 0.0, "Slow the data down (preemption tests).")
    flags.DEFINE_integer("fail_save_at_step", 0, "The last process cannot write its part of "
                         "the checkpoint at this step (ENOSPC, a full disk on that host).")
    flags.DEFINE_bool("read_only_probe", False, "The last process finds the checkpoint "
                      "directory read-only (EROFS) when it probes it before a save.")
    flags.DEFINE_bool("uneven_eval", False, "Give the last process one eval batch more "
                      "than the others (a broken eval set).")
    # The backend must not start before the device count is known: read the flag by hand.
    devices = next((a.split("=", 1)[1] for a in sys.argv
                    if a.startswith("--devices_per_process=")), "4")
    # (no LLVM optimisation: compile time dominates these tiny runs, see tests/conftest.py)
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                               "--xla_backend_optimization_level=0")

    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

    import train_toy as toy  # pylint: disable=import-outside-toplevel
    from tfx_jax import train as tr  # pylint: disable=import-outside-toplevel

    def run(config, workdir):
        f = flags.FLAGS
        if f.cache_dir:
            toy.use_compilation_cache(f.cache_dir)
        if f.fail_save_at_step and jax.process_index() == jax.process_count() - 1:
            fail_writes_of_step(f.fail_save_at_step)
        if f.read_only_probe and jax.process_index() == jax.process_count() - 1:
            refuse_probe_files()
        print(f"process {jax.process_index()} of {jax.process_count()}: "
              f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)
        def eval_batches():
            batches = list(toy.make_eval_batches(config.batch_size,
                                                 process_index=jax.process_index(),
                                                 process_count=jax.process_count()))
            if f.uneven_eval and jax.process_index() == jax.process_count() - 1:
                batches += batches[:1]
            return batches

        result = tr.train(config, workdir, toy.make_task(),
                          toy.make_train_iter(config.batch_size,
                                              seconds_per_batch=f.seconds_per_batch),
                          eval_batches=eval_batches)
        embedding = result.state.params["Embed_0"]["embedding"]
        print(f"process {jax.process_index()}: embedding {embedding.shape} sharded "
              f"{tuple(embedding.sharding.spec)}, local shard "
              f"{embedding.addressable_shards[0].data.shape}", flush=True)

    tr.launch.run(run, default_config=os.path.abspath(__file__))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
