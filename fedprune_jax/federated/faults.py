"""Simulated client faults inside the jitted round, and the server-side checks that survive them.

``with_faults(local_update, FaultConfig(...))`` wraps the local client update. Each client draws
its faults from its own key (``fold_in(client_rng, FAULT_STREAM)``, so from (seed, round,
client) and never from its cohort position):

* **dropout** (probability ``dropout``): the client never reports: zero update, weight 0,
  counted in ``dropped``;
* **straggler** (probability ``straggler``): the client completes only the first
  ``ceil(u * S)`` of its ``S`` local steps (``u ~ U(0, 1)``): its later steps are masked to
  no-ops, and its example count is what it actually trained on;
* **corrupt update** (probability ``corrupt``): its delta is multiplied by NaN
  (``corrupt_kind='nan'``) or by 1e6 (``'scale'``) on the way to the server.

Checks, per client, inside the same jitted step (no host round trip): a non-finite update, or
one whose global L2 norm exceeds ``max_update_norm``, is rejected (zero update, weight 0,
``failed``); an update above ``clip_norm`` is scaled down to it (``clipped``). The executors
renormalise by the surviving weights, and the round's metrics count each kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedprune_jax import fields
from fedprune_jax.federated import client as client_lib
from fedprune_jax.federated.client import ClientOutput

PyTree = Any
FAULT_STREAM = 0x0F4017


@dataclasses.dataclass(frozen=True)
class FaultConfig:
  """Fault rates (probabilities per sampled client) and server-side checks."""

  dropout: float = fields.default("faults.dropout")
  straggler: float = fields.default("faults.straggler")
  corrupt: float = fields.default("faults.corrupt")
  corrupt_kind: str = fields.default("faults.corrupt_kind")
  max_update_norm: float | None = fields.default("faults.max_update_norm")
  clip_norm: float | None = fields.default("faults.clip_norm")

  def __post_init__(self):
    for field in dataclasses.fields(self):
      fields.check(f"faults.{field.name}", getattr(self, field.name))

  @property
  def active(self) -> bool:
    return bool(
      self.dropout or self.straggler or self.corrupt or self.max_update_norm or self.clip_norm
    )


def draw_faults(rng: jax.Array, cfg: FaultConfig) -> dict[str, jax.Array]:
  """The client's faults: ``dropped``, ``straggler``, ``corrupt`` (bool) and ``fraction`` of its
  local steps completed (float32)."""
  k = jax.random.split(jax.random.fold_in(rng, FAULT_STREAM), 4)
  straggler = jax.random.uniform(k[1]) < cfg.straggler
  return {
    "dropped": jax.random.uniform(k[0]) < cfg.dropout,
    "straggler": straggler,
    "fraction": jnp.where(straggler, jax.random.uniform(k[2]), 1.0),
    "corrupt": jax.random.uniform(k[3]) < cfg.corrupt,
  }


def _norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def with_faults(local_update: Callable[..., ClientOutput], cfg: FaultConfig) -> Callable:
  """``local_update(params, data, rng, mask=None)`` with simulated faults and checks."""
  if not cfg.active:
    return local_update

  def update(params, data, rng, mask=None):
    f = draw_faults(rng, cfg)
    segments = client_lib.segments_of(data)
    steps = sum(seg["weights"].shape[0] for seg in segments)
    done = jnp.ceil(f["fraction"] * steps)
    truncated, offset = [], 0
    for seg in segments:  # the first ``done`` steps, counted across scan segments
      n = seg["weights"].shape[0]
      live = (offset + jnp.arange(n) < done).astype(seg["weights"].dtype)
      truncated.append(dict(seg, weights=seg["weights"] * live[:, None]))
      offset += n
    data = truncated[0] if isinstance(data, dict) else tuple(truncated)
    out = local_update(params, data, rng, mask)
    delta = out.update["delta"]
    bad = {"nan": jnp.nan, "scale": 1e6}[cfg.corrupt_kind]
    delta = jax.tree.map(lambda d: jnp.where(f["corrupt"], d * bad, d), delta)
    norm = _norm(delta)
    ok = jnp.isfinite(norm) & ~f["dropped"]
    if cfg.max_update_norm is not None:
      ok = ok & (norm <= cfg.max_update_norm)
    scale = jnp.float32(1.0)
    clipped = jnp.zeros((), bool)
    if cfg.clip_norm is not None:
      clipped = ok & (norm > cfg.clip_norm)
      scale = jnp.where(clipped, cfg.clip_norm / jnp.maximum(norm, 1e-12), 1.0)
    new_update = dict(out.update, delta=delta)
    new_update = jax.tree.map(lambda x: jnp.where(ok, x * scale, jnp.zeros_like(x)), new_update)
    rejected = ~ok & ~f["dropped"]
    failed = jnp.maximum(out.metrics["failed"], rejected.astype(jnp.float32))
    metrics = dict(
      out.metrics,
      loss=jnp.where(ok, out.metrics["loss"], 0.0),
      failed=jnp.where(f["dropped"], 0.0, failed),
      dropped=f["dropped"].astype(jnp.float32),
      straggler=f["straggler"].astype(jnp.float32),
      corrupt=f["corrupt"].astype(jnp.float32),
      clipped=clipped.astype(jnp.float32),
    )
    return out._replace(update=new_update, metrics=metrics)

  return update
