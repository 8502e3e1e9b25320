"""Shared pytest setup.

Four fake CPU devices so that every sharding path (data x model mesh) runs in
tests; this must happen before jax is first imported.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=4"
# Tests are dominated by XLA compile time; backend optimizations do not change
# results enough to matter at our tolerances and roughly halve compile time.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow must not grab accelerators or many threads next to JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
