"""STAT: Shrinking Temporal Attention Transformer (AAAI 2022) in JAX / Flax NNX."""
