"""Checkpoint IO: Hugging Face LLaVA / LLaVA-OneVision safetensors <-> our parameter tree."""
from covipal_jax.weights.hf import (  # noqa: F401
    Checkpoint,
    abstract_params,
    check_config,
    config_from_hf,
    export_llava,
    hf_config_dict,
    load_llava,
)
from covipal_jax.weights.keymap import (  # noqa: F401
    LAYOUTS,
    TRANSFORMS,
    Entry,
    detect_layout,
    key_map,
)
