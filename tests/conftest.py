"""Shared pytest setup: quiet TF/absl logs, f32 matmuls on CPU."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu may be installed (AOT tests)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests compile many small programs: XLA's CPU backend optimizations cost ~4x the compile
# time and buy nothing at these sizes (numerics are unchanged: parity tests still hold).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
