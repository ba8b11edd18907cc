"""Pallas kernels of stat_jax (TPU; interpret mode runs them on the CPU)."""
