"""fedprune_jax.pruning."""
