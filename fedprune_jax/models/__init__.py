"""fedprune_jax.models."""
