"""Shared command-line setup of every entry point: quiet logs, no stray TPU probing, a
persistent compilation cache, and a `--help` that exits 0.

Entry points call `cli.run(main)` instead of `absl.app.run(main)`:

- **Platforms.** With `JAX_PLATFORMS` unset and no TPU device on the machine (`/dev/accel*`,
  `/dev/vfio/<n>`), JAX is told not to look for one (`cpu`, or `cuda,cpu` where an NVIDIA
  device and JAX's CUDA plugin exist), so an installed libtpu prints no initialization
  errors. A set `JAX_PLATFORMS` is never changed.
- **Logs.** absl logging at WARNING (Orbax, TFDS and JAX INFO lines hidden); `--verbosity=0`
  (INFO) or `-v 1` (DEBUG) brings them back. The project's own `covipal_jax.*` loggers stay at
  INFO. `TF_CPP_MIN_LOG_LEVEL=3` unless set.
- **Compilation cache.** XLA programs are cached on disk (`--compilation_cache DIR`, default
  `$JAX_COMPILATION_CACHE_DIR` or `~/.cache/covipal_jax/xla`; `--compilation_cache=` turns it
  off), so a second run of the same command skips compilation.
- **Help.** `--help`, `-h`, `--helpshort`, `--helpfull` print the module docstring and the flags
  and exit 0 (absl exits 1).

The console scripts of the package (`covipal-generate`, `covipal-train`, `covipal-eval`,
`covipal-demo`) run the same modules as `python -m covipal_jax.<name>`.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import runpy
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

DEFAULT_CACHE = os.path.join("~", ".cache", "covipal_jax", "xla")
_HELP = {"help", "?", "helpshort", "helpfull", "helpxml"}
_CACHE = flags.DEFINE_string(
    "compilation_cache", os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE,
    "Persistent XLA compilation cache directory (local or gs://); empty: off. A second run "
    "of the same command reuses the compiled programs.")


# ----------------------------------------------------------------------------- environment

def tpu_present() -> bool:
    """True when this machine exposes a TPU device (TPU VMs: /dev/accel* or /dev/vfio/<n>)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _gpu_platforms() -> str | None:
    if glob.glob("/dev/nvidia[0-9]*") and (importlib.util.find_spec("jax_cuda12_plugin")
                                            or importlib.util.find_spec("jax_plugins")):
        return "cuda,cpu"
    return None


def default_platforms() -> str | None:
    """The `JAX_PLATFORMS` value to set when the user set none (None: let JAX choose)."""
    if tpu_present():
        return None
    gpu = _gpu_platforms()
    if gpu:
        return gpu
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
        return None          # a GPU without a plugin we know: let JAX decide
    return "cpu"


def configure_environment() -> None:
    """Environment for a JAX program; call before JAX initializes its backends (idempotent).

    Sets `JAX_PLATFORMS` when unset (see `default_platforms`) and `TF_CPP_MIN_LOG_LEVEL=3`
    when unset. Used by `run` and by notebooks.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "JAX_PLATFORMS" not in os.environ:
        platforms = default_platforms()
        if platforms:
            os.environ["JAX_PLATFORMS"] = platforms
            if "jax" in sys.modules:   # already imported: its config read the environment
                sys.modules["jax"].config.update("jax_platforms", platforms)


def enable_compilation_cache(directory: str | None = DEFAULT_CACHE) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (None / "": off).

    Every program is cached (no minimum compile time: the tiny models' programs compile in
    well under JAX's default 1 s threshold) unless the JAX_PERSISTENT_CACHE_MIN_* variables
    say otherwise. Returns the directory used.
    """
    if not directory:
        return None
    import jax

    directory = directory if "://" in directory else os.path.expanduser(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


# ----------------------------------------------------------------------------- flags, logs

def _is_help(arg: str) -> bool:
    return arg.startswith("-") and arg.lstrip("-").split("=")[0] in _HELP


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with a 0 exit status for help and WARNING as the default verbosity."""
    argv = ["--help" if a == "-h" else a for a in argv]
    try:
        rest = app.parse_flags_with_usage(argv)
    except SystemExit as e:
        if e.code == 1 and any(_is_help(a) for a in argv[1:]):
            sys.stdout.flush()
            raise SystemExit(0) from None
        raise
    if flags.FLAGS["verbosity"].using_default_value:
        flags.FLAGS.verbosity = -1          # WARNING (absl.app would raise it to INFO)
    return rest


def quiet_logging() -> None:
    """Our own loggers at INFO whatever the absl verbosity; noisy third parties at WARNING."""
    logging.getLogger("covipal_jax").setLevel(logging.INFO)


# ----------------------------------------------------------------------------- run

def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
    """`absl.app.run(main)` with the project's command-line setup (see the module docstring)."""
    configure_environment()
    main_module = sys.argv[0] if argv is None else argv[0]
    flags.FLAGS["verbosity"].help = ("Logging verbosity: -1 warnings (default; hides the "
                                     "INFO lines of Orbax, TFDS and JAX), 0 info, 1 debug.")
    for name in ("verbosity", "compilation_cache"):   # listed by --help with the program's own
        flags.FLAGS.register_key_flag_for_module(main_module, flags.FLAGS[name])

    def wrapped(args):
        quiet_logging()
        enable_compilation_cache(_CACHE.value)
        return main(args)

    app.run(wrapped, argv=list(argv) if argv is not None else None, flags_parser=parse_flags)


def _run_module(name: str) -> None:
    """Runs `python -m <name>` in this process (console scripts)."""
    configure_environment()
    runpy.run_module(name, run_name="__main__", alter_sys=True)


def generate() -> None:
    _run_module("covipal_jax.generate")


def train() -> None:
    _run_module("covipal_jax.train")


def evaluate() -> None:
    _run_module("covipal_jax.eval")


def demo() -> None:
    _run_module("covipal_jax.demo")
