"""Training of the PPM: objectives, loop, checkpoints; the CLI is `python -m covipal_jax.train`."""
