"""fedjax interop: fedjax data in, our vmap engine out as a fedjax backend.

* ``store_from_fedjax(fd, batch_size)``: a ``fedjax.FederatedData`` becomes an
  ``InMemoryClientStore`` (each client's examples packed into ``[S, B, ...]``
  with a ``weights`` field; clients bucketed by S).
* ``VmapBackend(block_size)``: a ``fedjax.for_each_client`` backend (fedjax has
  jit / pmap / debug ones, no vmap). Clients are processed in blocks of
  ``block_size``: ``client_init`` / ``client_final`` are vmapped, and a
  ``lax.scan`` over the block's padded steps runs the vmapped ``client_step``,
  keeping a client's state where its step is padding. Use it with
  ``fedjax.for_each_client_backend(VmapBackend(16))``.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.federated.client_data import InMemoryClientStore
from fedprune_jax.federated.packing import Bucket, pack_client
from fedprune_jax.federated.fedjax_compat import fedjax  # noqa: F401
from fedprune_jax.federated.fedjax_compat import for_each_client_lib

PyTree = Any


def _rows(columns: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """Per-example dicts (``pack_client``'s input) of fixed-shape columns ``{key: [n, ...]}``; a
  ``weights`` column becomes each example's ``weight``."""
  n = len(next(iter(columns.values())))
  weights = columns.get("weights", np.ones(n, np.float32))
  keys = [k for k in columns if k != "weights"]
  return [{**{k: columns[k][i] for k in keys}, "weight": weights[i]} for i in range(n)]


def store_from_fedjax(fd, batch_size: int, num_buckets: int = 4) -> InMemoryClientStore:
  """Converts a ``fedjax.FederatedData`` (fixed-shape features) to a store.

  Client names are the fedjax client ids (bytes decoded as UTF-8 where
  possible); ids in the store are the positions in ``fd.client_ids()``.
  """
  names, examples = [], []
  for cid in fd.client_ids():
    ex = {k: np.asarray(v) for k, v in fd.get_client(cid).all_examples().items()}
    if not ex or len(next(iter(ex.values()))) == 0:
      raise ValueError(f"fedjax client {cid!r} has no examples")
    names.append(cid.decode("utf-8", "replace") if isinstance(cid, bytes) else str(cid))
    examples.append(ex)
  first = examples[0]
  shapes = {k: v.shape[1:] for k, v in first.items() if k != "weights"}
  dtypes = {k: v.dtype.name for k, v in first.items() if k != "weights"}
  steps = np.array([-(-len(next(iter(e.values()))) // batch_size) for e in examples])
  qs = np.quantile(steps, np.linspace(0, 1, num_buckets + 1)[1:], method="higher")
  edges = np.unique(qs.astype(np.int64))
  buckets = [Bucket(int(s), batch_size, shapes, dtypes, paddings={}) for s in edges]
  bucket_of = np.searchsorted(edges, steps)
  packed = []
  for name, ex, b in zip(names, examples, bucket_of):
    for k in shapes:
      if k not in ex or ex[k].shape[1:] != shapes[k]:
        raise ValueError(
          f"fedjax client {name!r}: field {k!r} missing or of "
          f"shape {None if k not in ex else ex[k].shape}"
        )
    packed.append(pack_client(_rows(ex), buckets[b], name=f"fedjax client {name!r}"))
  return InMemoryClientStore(packed, buckets, bucket_of, names)


def _stack(trees):
  # jnp.stack also handles typed PRNG key arrays (client rngs)
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


class VmapBackend(for_each_client_lib.ForEachClientBackend):
  """fedjax ``for_each_client`` backend that vmaps over blocks of clients."""

  def __init__(self, block_size: int = 8):
    if block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {block_size}")
    self.block_size = block_size

  def __call__(self, client_init, client_step, client_final):
    v_init = jax.jit(jax.vmap(client_init, in_axes=(None, 0)))
    v_final = jax.jit(jax.vmap(client_final, in_axes=(None, 0)))

    @jax.jit
    def run_steps(state, batches, live):
      """state [C,...]; batches [S, C, ...]; live bool[S, C]."""

      def body(s, xs):
        batch, mask = xs
        new_s, result = jax.vmap(client_step)(s, batch)
        sel = lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)
        return jax.tree_util.tree_map(sel, new_s, s), result

      return jax.lax.scan(body, state, (batches, live))

    block_size = self.block_size

    def run(shared_input, clients: Iterable):
      block = []
      for item in clients:
        block.append(item)
        if len(block) == block_size:
          yield from _run_block(shared_input, block)
          block = []
      if block:
        yield from _run_block(shared_input, block)

    def _run_block(shared_input, block):
      ids = [c[0] for c in block]
      batches = [list(c[1]) for c in block]
      inputs = [c[2] for c in block]
      n_real = len(block)
      while len(inputs) < block_size:  # padding clients: outputs are dropped
        inputs.append(inputs[0])
        batches.append([])
      num = [len(b) for b in batches]
      max_steps = max(num)
      template = next((b[0] for b in batches if b), None)
      zero = jax.tree_util.tree_map(np.zeros_like, template)
      for i, b in enumerate(batches):
        for batch in b:
          if jax.tree_util.tree_structure(batch) != jax.tree_util.tree_structure(template) or any(
            np.shape(x) != np.shape(y)
            for x, y in zip(jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(template))
          ):
            raise ValueError(
              f"client {ids[min(i, n_real - 1)]!r}: batches "
              "must all have the same structure and shapes "
              "for the vmap backend"
            )
      steps = [_stack([b[s] if s < len(b) else zero for b in batches]) for s in range(max_steps)]
      live = np.array([[s < n for n in num] for s in range(max_steps)])
      state = v_init(shared_input, _stack(inputs))
      if max_steps:
        state, results = run_steps(state, _stack(steps), live)
      else:
        results = None
      out = v_final(shared_input, state)
      for i in range(n_real):
        client_out = jax.tree_util.tree_map(lambda x: x[i], out)
        step_results = (
          []
          if results is None
          else [jax.tree_util.tree_map(lambda x: x[s, i], results) for s in range(num[i])]
        )
        yield ids[i], client_out, step_results

    return run
