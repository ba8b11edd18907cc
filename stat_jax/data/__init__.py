"""The input side of stat-jax: DMVR shards, synthetic data, tf.data pipelines."""
