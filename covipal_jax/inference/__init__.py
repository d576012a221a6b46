"""Inference: pruned prefill (where the model and a pruning method meet), decoding, loading, and
the facade every front end uses (`sampler.Sampler`)."""
