"""fedprune_jax.data."""
