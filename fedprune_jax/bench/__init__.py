"""fedprune_jax.bench."""
