"""Inference: pruned prefill (where the model and a pruning method meet), decoding, loading."""
