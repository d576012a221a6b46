"""Shared pytest setup: quiet TF/absl logs, f32 matmuls on CPU."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu may be installed (AOT tests)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
