"""Meshes from config, and the sharded forward pass on 8 fake CPU devices."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from covipal_jax import sharding


def test_mesh_shape_fill_and_errors():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 4) == (1, 4, 1)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ValueError, match="needs"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 8, jax.devices()
    import flax.linen as nn
    from covipal_jax.configs import tiny as tc
    from covipal_jax import sharding
    from covipal_jax.models.config import LlavaConfig
    from covipal_jax.models import llava
    c = tc.get_config()
    cfg = LlavaConfig.from_config(c.model)
    init = lambda r: llava.init_params(cfg, r)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)
    ids = rng.integers(5, 300, size=(4, 10)).astype(np.int32); ids[:, 2] = 4
    mask = np.ones((4, 10), bool); mask[1, :2] = False; ids[1, :2] = 0
    model = llava.Llava(cfg)
    single = nn.unbox(init(jax.random.key(0)))
    ref, _ = jax.jit(model.apply)(single, pixels, ids, mask)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, shardings = sharding.init_sharded(init, jax.random.key(0), mesh,
                                              c.logical_axis_rules)
    q = params["params"]["language_model"]["layers"]["stack"]["q"]["kernel"]
    assert q.sharding.spec == jax.P(None, "fsdp", "tensor", None), q.sharding.spec
    with sharding.use_mesh(mesh, c.logical_axis_rules):
        batch = sharding.put_batch(mesh, (pixels, ids, mask))
        out, _ = jax.jit(model.apply, in_shardings=(shardings, *[b.sharding for b in batch]))(
            params, *batch)
    assert len(out.sharding.device_set) == 8
    diff = float(jnp.abs(out - ref).max())
    print("MAXDIFF", diff)
    assert diff < 1e-4, diff
    # The PPM applies under the same mesh and rules (real-shape kernels, logical names).
    from covipal_jax.pruning.ppm import PPM, PPMConfig
    pcfg = PPMConfig(n_v=64, d_model=64, width=32, num_heads=2)
    v = jnp.asarray(rng.normal(size=(4, 64, 64)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 6, 64)), jnp.float32)
    tm = jnp.ones((4, 6), bool)
    pv = nn.unbox(PPM(pcfg).init(jax.random.key(1), v, t, tm))
    ref_s = PPM(pcfg).apply(pv, v, t, tm)
    with sharding.use_mesh(mesh, c.logical_axis_rules):
        s = jax.jit(PPM(pcfg).apply)(pv, *sharding.put_batch(mesh, (v, t, tm)))
    assert float(jnp.abs(s - ref_s).max()) < 1e-4
""")


@pytest.mark.slow
def test_sharded_forward_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "MAXDIFF" in r.stdout
