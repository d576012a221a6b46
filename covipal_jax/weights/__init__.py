"""Checkpoint IO: Hugging Face LLaVA / LLaVA-OneVision safetensors <-> our parameter tree.

`hf_config` (config.json <-> LlavaConfig, the config check), `safetensors_io` (the validated
reader and the writer), `hf` (load / export), `keymap` (HF key <-> parameter path), `ppm_io`
(the PPM artifact).
"""
from covipal_jax.weights.hf import (  # noqa: F401
    abstract_params,
    export_llava,
    load_llava,
)
from covipal_jax.weights.hf_config import (  # noqa: F401
    check_config,
    computation_dict,
    config_from_hf,
    hf_config_dict,
    resolve_config,
)
from covipal_jax.weights.keymap import (  # noqa: F401
    LAYOUTS,
    TRANSFORMS,
    Entry,
    detect_layout,
    key_map,
)
from covipal_jax.weights.safetensors_io import (  # noqa: F401
    Checkpoint,
    SafetensorsError,
    SafetensorsFile,
    save_safetensors,
)
