"""TPU topologies for ahead-of-time compiles on a CPU host (`tools/aot.py`): chip generations,
slice-name aliases, compile-only devices (`jax.experimental.topologies`, needs libtpu) and a
mesh over them shaped by a config's `mesh` section.
"""
from __future__ import annotations

import os

# chip generation -> (HBM GiB per chip, peak bf16 TFLOP/s per chip, HBM GB/s per chip).
CHIPS = {
    "v4": (32, 275, 1228),
    "v5e": (16, 197, 819),
    "v5p": (95, 459, 2765),
    "v6e": (32, 918, 1640),
}
# Common slice names -> topology names (TensorCores: v4-8 / v5p-8 are 4 chips, megacore).
ALIASES = {
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5litepod-4": "v5e:2x2",
    "v5litepod-8": "v5e:2x4", "v5litepod-16": "v5e:4x4",
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
}

def setup_host(accelerator_type: str = "v5litepod-4") -> None:
    """Environment for compile-only TPU devices on a CPU host. Call before any JAX backend."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Another process holding libtpu's lock file (any JAX program on this host) must not stop
    # a compile-only client.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax
    jax.config.update("jax_platforms", "cpu")


def libtpu_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def resolve_topology(name: str) -> tuple[str, str]:
    """A topology or slice name -> (topology name, chip generation)."""
    topo = ALIASES.get(name, name)
    gen = topo.split(":")[0]
    if gen == "v5litepod":
        gen = "v5e"
    if gen not in CHIPS or ":" not in topo:
        raise ValueError(f"unknown topology {name!r}: use e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, "
                         f"v6e:2x4 or one of {sorted(ALIASES)}")
    return topo, gen


def topology_devices(name: str) -> tuple[list, str]:
    """Compile-only devices of a TPU topology (one per chip: megacore on v4 / v5p)."""
    from jax.experimental import topologies

    topo, gen = resolve_topology(name)
    kw = {"chip_config_name": "megacore"} if gen in ("v4", "v5p") else {}
    desc = topologies.get_topology_desc(topology_name=topo, platform="tpu", **kw)
    return list(desc.devices), gen


def topology_mesh(config, topology: str):
    """(Mesh over the topology's compile-only devices shaped by `config.mesh`, chip generation)."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    from covipal_jax import sharding as sh

    devices, gen = topology_devices(topology)
    shape = sh.mesh_shape(config.mesh.to_dict(), len(devices))
    try:
        arr = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, sh.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape)), gen
