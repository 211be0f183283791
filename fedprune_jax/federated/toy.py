"""A tiny model on the ASR batch layout, for engine tests and benchmarks.

Masked mean-pooling of ``features`` over valid frames, a tanh MLP, and a
softmax over classes with target ``labels[:, 0] - 1``. Optional feature
dropout uses the rng, so rng plumbing is exercised too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_params(rng: jax.Array, feature_dim: int, num_classes: int, hidden: int = 16) -> dict:
  """Params ``{'hidden': {kernel [F,H], bias [H]}, 'out': {kernel [H,K],
  bias [K]}}``."""
  k1, k2 = jax.random.split(rng)
  return {
    "hidden": {
      "kernel": jax.random.normal(k1, (feature_dim, hidden)) / jnp.sqrt(feature_dim),
      "bias": jnp.zeros((hidden,)),
    },
    "out": {
      "kernel": jax.random.normal(k2, (hidden, num_classes)) / jnp.sqrt(hidden),
      "bias": jnp.zeros((num_classes,)),
    },
  }


def per_example_loss(params: dict, batch: dict, rng: jax.Array, dropout: float = 0.0) -> jax.Array:
  """float32[B] cross-entropy; batch features [B,T,F], feature_paddings
  [B,T], labels [B,L] (class = labels[:,0]-1)."""
  x = batch["features"]
  valid = 1.0 - batch["feature_paddings"]
  if dropout > 0.0:
    keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - dropout), 0.0)
  pooled = (x * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1), 1.0)[:, None]
  h = jnp.tanh(pooled @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = h @ params["out"]["kernel"] + params["out"]["bias"]
  target = jnp.maximum(batch["labels"][:, 0] - 1, 0)
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, target[:, None], axis=1)[:, 0]


def make_loss_fn(dropout: float = 0.0):
  """``loss_fn(params, batch, rng) -> (sum(w*l)/max(sum(w),1), {})``."""

  def loss_fn(params, batch, rng):
    l = per_example_loss(params, batch, rng, dropout)
    w = batch["weights"]
    return jnp.sum(w * l) / jnp.maximum(jnp.sum(w), 1.0), {}

  return loss_fn


def flops_per_example(feature_dim: int, num_frames: int, hidden: int, num_classes: int) -> float:
  """Approximate training FLOPs per example (forward + backward = 3x fwd)."""
  fwd = 2 * num_frames * feature_dim + 2 * feature_dim * hidden + 2 * hidden * num_classes
  return 3.0 * fwd
