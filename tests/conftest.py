"""Test setup: 8 simulated CPU devices, so data-parallel tests see a real mesh.

The flag must be set before the JAX backend starts, hence at import time of
the conftest, before any test module imports jax.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
