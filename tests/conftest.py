"""Test setup: 8 simulated CPU devices, so data-parallel tests see a real mesh.

The flags must be set before the JAX backend starts, hence at import time of
the conftest, before any test module imports jax. Subprocesses the tests start
(the experiment scripts) inherit them through the environment.

``--xla_backend_optimization_level=0`` turns off LLVM's optimisation passes in
XLA:CPU's code generation. The suite's models are tiny, so compiling, not
running, is where its time goes: this flag alone cuts ~35-45% of the wall time
of the compile-heavy files (tests/test_sharding.py 152 s -> 85 s). The HLO
(fusion, sharding, buffer assignment, hence every ``memory_analysis()`` and
cost-analysis number the tests check) is the same; fast-math stays off, so the
arithmetic is the same IEEE float32 the tests compare against references.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_TEST_XLA_FLAGS = {"xla_force_host_platform_device_count": "8",
                   "xla_backend_optimization_level": "0"}
_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in _TEST_XLA_FLAGS.items():
    if _name not in _flags:
        _flags = f"{_flags} --{_name}={_value}"
os.environ["XLA_FLAGS"] = _flags.strip()
