"""Test setup: 8 simulated CPU devices, so data-parallel tests see a real mesh.

The flags must be set before the JAX backend starts, hence at import time of
the conftest, before any test module imports jax. Subprocesses the tests start
(the experiment scripts) and the xdist workers inherit them through the
environment.

Compiling, not running, is where the suite's time goes (its models are tiny), so:

- ``--xla_backend_optimization_level=0`` turns off LLVM's optimisation passes in
  XLA:CPU's code generation: ~35-45% off the compile-heavy files
  (tests/test_sharding.py 152 s -> 85 s). The HLO (fusion, sharding, buffer
  assignment, hence every ``memory_analysis()`` and cost-analysis number the tests
  check) is the same; fast-math stays off, so the arithmetic is the same IEEE
  float32 the tests compare against their references.
- JAX's persistent compilation cache, in one temporary directory for the whole
  session (its workers and subprocesses), removed when the session ends: every
  ``train()`` call and every fresh ``jax.jit`` of an identical program (same HLO,
  same devices, same flags) loads the executable instead of compiling it again.
"""
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_TEST_XLA_FLAGS = {"xla_force_host_platform_device_count": "8",
                   "xla_backend_optimization_level": "0"}
_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in _TEST_XLA_FLAGS.items():
    if _name not in _flags:
        _flags = f"{_flags} --{_name}={_value}"
os.environ["XLA_FLAGS"] = _flags.strip()

# The process that starts the session (the xdist controller, or the only process with
# -n 0) makes the cache directory; the workers it spawns inherit the variable.
_CACHE_VARIABLE = "TFX_JAX_TEST_COMPILATION_CACHE"
_OWN_CACHE = None
if _CACHE_VARIABLE not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="tfx_jax_test_jit_cache_")
    os.environ[_CACHE_VARIABLE] = _OWN_CACHE
# JAX reads these when it is imported (here: the workers and the scripts' subprocesses) ...
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_CACHE_VARIABLE])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


# Modules whose tests share an expensive module-scoped fixture (a trained workdir, a
# prepared dataset). `pytest -n 2` hands tests out one by one ("load"), so both workers
# would build such a fixture; these modules go to one worker as a whole instead.
# (xdist's own --dist loadgroup marks do not work with pytest 9: it rewrites item._nodeid,
# which pytest 9 no longer reads.)
ONE_WORKER_MODULES = ("test_robustness.py", "test_train_loop.py", "test_data_text.py",
                      "test_data_vision.py", "test_dalle_experiment.py",
                      "test_vit_experiment.py", "test_bad_input.py",
                      "test_lm_script.py",  # its trained workdir
                      "test_sharding.py")  # its one-device reference losses, once


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist choice is kept
    from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

    class ModuleFixtureScheduling(LoadScopeScheduling):
        """Like "load" (every test its own unit), but ONE_WORKER_MODULES are one unit each."""

        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if os.path.basename(module) in ONE_WORKER_MODULES else nodeid

    return ModuleFixtureScheduling(config, log)


def pytest_configure(config):
    # The cache: the environment variables above cover the processes that import jax
    # later; this covers a jax imported by a plugin before this file ran.
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
