"""The end-to-end demo (`python -m covipal_jax.demo`): data, tiny LLaVA, PPM, sweep."""
