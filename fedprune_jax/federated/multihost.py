"""Device meshes over the client axis, and multi-process (multi-host) feeding.

The cohort's client axis is sharded over a 1-D mesh axis named ``clients``
(the modern equivalent of pmap). With several processes
(``jax.distributed``), every process runs the same program, walks the same
chunk plan, and feeds only the rows of each chunk that land on its own
devices; params are replicated.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
CLIENTS = "clients"


def initialize(
  coordinator_address: str, num_processes: int, process_id: int, cpu_collectives: bool = True
) -> None:
  """``jax.distributed.initialize`` (gloo collectives for CPU backends).

  Must run before any other JAX call in the process.
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )


def client_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``clients`` over ``devices`` (default: all, of
  every process, in process order)."""
  devs = np.asarray(jax.devices() if devices is None else list(devices))
  return Mesh(devs, (CLIENTS,))


def local_rows(mesh: Mesh, chunk_size: int) -> slice:
  """Rows of a ``[chunk_size, ...]`` chunk that this process must feed.

  Requires each process's devices to be contiguous along the mesh axis (the
  default ``client_mesh`` order).
  """
  n = mesh.devices.size
  if chunk_size % n:
    raise ValueError(f"chunk_size {chunk_size} must be a multiple of the mesh size {n}")
  per_dev = chunk_size // n
  pidx = jax.process_index()
  mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == pidx]
  if mine != list(range(mine[0], mine[-1] + 1)):
    raise ValueError("this process's devices are not contiguous in the mesh")
  return slice(mine[0] * per_dev, (mine[-1] + 1) * per_dev)


def put_client_sharded(tree: PyTree, mesh: Mesh, global_rows: int) -> PyTree:
  """Places host arrays sharded along axis 0 (the client axis) of ``mesh``.

  Args:
    tree: pytree of numpy arrays; in a multi-process run each process passes
      only its ``local_rows`` of axis 0.
    mesh: client mesh.
    global_rows: size of axis 0 over all processes.
  """
  sharding = NamedSharding(mesh, P(CLIENTS))
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(
      sharding, np.asarray(x), (global_rows,) + np.shape(x)[1:]
    ),
    tree,
  )


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
  """Replicates a pytree (identical in every process) over ``mesh``."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      # typed keys have no numpy form: replicate the raw key data
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree_util.tree_map(put, tree)


def fetch(tree: PyTree) -> PyTree:
  """Host numpy copy of fully replicated (or single-device) arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x), tree)
