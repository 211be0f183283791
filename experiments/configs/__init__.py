"""Named experiment configs; installed as the package ``fedprune_jax.configs``."""
