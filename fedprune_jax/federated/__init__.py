"""fedprune_jax.federated."""
