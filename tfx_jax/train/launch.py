"""One entry point for every training script: flags, multi-host start, clean exits.

A script defines ``main(config, workdir)`` and ends with
``launch.run(main, default_config=__file__-relative path)``. Then

    python experiments/x.py --workdir=DIR [--config=experiments/configs/x.py]
                            [--config.batch_size=64 ...]
                            [--multihost] [--coordinator_address=HOST:PORT
                             --num_processes=N --process_id=I]

works the same for all scripts (the Flax-examples convention), and:

* several processes start JAX's own runtime (``jax.distributed.initialize``):
  ``--multihost`` lets JAX detect the cluster (Cloud TPU VMs, SLURM, ...);
  explicit coordinator flags or ``JAX_COORDINATOR_ADDRESS`` configure it by hand;
* preemption (SIGTERM) exits with code 143 and Ctrl-C (SIGINT) with 130 after
  the checkpoint is saved, and a non-finite loss exits with code 3, each with a
  message on stderr; Ctrl-C outside training exits 130 with one line, also where
  Python would swallow it (a gc callback: see ``loop.install_interrupt_handler``);
* a failed run does not wait for background threads at exit (Orbax's writers
  after a failed save would wait minutes for signals that never come);
* a user's mistake, i.e. a :class:`tfx_jax.errors.UserError` (a bad config key
  or value, bad data, a workdir in use, of another script, unwritable or full, a
  damaged checkpoint) exits with code 2 and one ``error: ...`` line;
  ``--verbosity=1`` shows the traceback instead. Every other exception, a
  ``ValueError`` or ``OSError`` included, is a bug until proven otherwise and
  keeps its traceback. ``with launch.user_errors():`` does the same inside a script.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Callable, Iterator

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tfx_jax.errors import ConfigError, UserError
from tfx_jax.train.loop import (INTERRUPT_EXIT_CODE, NonFiniteError, Preempted,
                                install_interrupt_handler)
from tfx_jax.train.mesh import initialize_distributed

NONFINITE_EXIT_CODE = 3
USER_ERROR_EXIT_CODE = 2


def _show_traceback() -> bool:
    f = flags.FLAGS
    return "verbosity" in f and f.is_parsed() and f["verbosity"].present and f.verbosity >= 1


def _one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message's lines joined with spaces)."""
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text += f": {error.filename}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a :class:`UserError` into ``error: <message>`` on stderr and exit code 2: an
    error that names what to fix needs no traceback (``--verbosity=1`` shows it anyway)."""
    try:
        yield
    except UserError as error:
        if _show_traceback():
            raise
        # one write, newline included: a line that other threads or C++ code writing to
        # stderr at the same moment cannot split (print writes the newline separately)
        sys.stderr.write(f"error: {_one_line(error)}\n")
        sys.stderr.flush()
        sys.exit(USER_ERROR_EXIT_CODE)


def action(name: str, what: str):
    """The value of the action flag ``--name`` if the command line gave it, else None.

    A flag that was given means its action, even with an empty value (say an
    unset shell variable, ``--predict="$FILES"``): that is refused with one
    :class:`tfx_jax.errors.ConfigError` naming ``what`` it needs, never taken as
    "no flag" (which would train).
    """
    flag = flags.FLAGS[name]
    if not flag.present:
        return None
    values = flag.value if isinstance(flag.value, list) else [flag.value]
    if not any(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(f"--{name} was given without {what} (an empty value, e.g. an unset "
                          f"shell variable); pass {what}, or leave the flag out to train")
    return flag.value


def _define_flags(default_config: str) -> None:
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.",
                        required=True)
    try:  # --config.KEY=VALUE overrides are applied here, at definition time
        config_flags.DEFINE_config_file("config", default_config,
                                        "Config file (ml_collections).", lock_config=True)
    except (AttributeError, KeyError) as e:  # a misspelt --config.KEY
        message = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ")
        message = message.replace("\n", " ").replace("\\'", "'").replace("\'", "'")
        print(f"error: unknown config key {message} (in a --config.KEY=VALUE flag)",
              file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    flags.DEFINE_bool("multihost", False, "Let jax.distributed detect the cluster "
                      "(Cloud TPU VM / pod slice, SLURM, Open MPI).")
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (GPU clusters).")
    flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
    flags.DEFINE_string("compile_topology", None, "Compile the run's train and eval steps for "
                        "this target instead of training (v5e:2x4, v5p-32, v6e-8, h100:8, ...; "
                        "tfx_jax.train.topology); writes WORKDIR/compile/NAME.json, exits 0 if "
                        "it fits, 2 if not.")
    flags.DEFINE_integer("compile_num_slices", 1, "TPU slices of --compile_topology "
                         "(multi-slice: data parallelism across slices).")
    flags.DEFINE_string("compile_search", None, "With --compile_topology: 'batch_size' finds "
                        "the largest global batch that fits (a few compiles); "
                        "'batch_size,remat_policy' finds it for each remat policy (the "
                        "report is the best one's).")


def _exit_without_waiting(code: int) -> None:
    """A failed run ends now: background threads still alive (e.g. Orbax's writers after
    a failed save, which wait minutes for signals that never come) are not waited for."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(main: Callable, default_config: str) -> None:
    """Parses flags, starts the multi-host runtime if asked, calls ``main(config, workdir)``."""
    install_interrupt_handler()  # Ctrl-C from here on: one line, exit 130
    try:
        _run(main, default_config)
    except KeyboardInterrupt:
        print(_INTERRUPTED, file=sys.stderr)
        _exit_without_waiting(INTERRUPT_EXIT_CODE)
        sys.exit(INTERRUPT_EXIT_CODE)
    except SystemExit as e:
        if e.code == USER_ERROR_EXIT_CODE:  # preempted / interrupted runs saved and waited
            _exit_without_waiting(e.code)
        raise


_INTERRUPTED = ("Stopped: interrupted (SIGINT) outside training steps; nothing was saved by "
                "this interruption (checkpoints already written are kept)")


def _run(main: Callable, default_config: str) -> None:
    _define_flags(default_config)

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        f = flags.FLAGS
        if not f["verbosity"].present:  # keep Orbax's per-save INFO lines out of the way
            logging.set_verbosity(logging.WARNING)
        target = contextlib.nullcontext()
        compiled = ()  # the exception a compile-only run ends with, exit 0
        if f.compile_search and not f.compile_topology:
            print("error: --compile_search needs --compile_topology", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT_CODE)
        if f.compile_topology:
            from tfx_jax.train import topology  # pylint: disable=import-outside-toplevel
            compiled = topology.Compiled
            with user_errors():
                target = topology.compiling_for(topology.parse_target(
                    f.compile_topology, f.compile_num_slices), f.compile_search)
            jax.config.update("jax_platforms", "cpu")  # compile only: probe for no chip
        else:
            initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                                   auto_detect=f.multihost)
        try:
            with user_errors(), target:
                main(f.config, f.workdir)
        except compiled:
            sys.exit(0)
        except Preempted as e:
            print(f"Stopped: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except NonFiniteError as e:
            print(f"Stopped: {e}", file=sys.stderr)
            sys.exit(NONFINITE_EXIT_CODE)
        except KeyboardInterrupt:
            if _show_traceback():
                raise
            print(_INTERRUPTED, file=sys.stderr)
            sys.exit(INTERRUPT_EXIT_CODE)

    app.run(_main)
