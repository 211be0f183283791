"""fedprune_jax.train."""
