"""Client stores: host-side per-client data handed out one chunk of clients at a time.

A ``ClientStore`` keeps per-client data on the host and hands out one chunk of
clients ``[C, S, B, ...]`` at a time (the layout of ``packing.py``), so host memory for a round
is bounded by the chunk size, not the cohort size. Two stores: ``InMemoryClientStore`` (packed
clients) and ``SyntheticClientStore`` (random clients made on demand, for tests and benchmarks).

Packing (``packing.py``) and bucket planning (``buckets.py``) are re-exported here.
"""

from __future__ import annotations

import abc
from typing import Mapping, Sequence

import numpy as np

from fedprune_jax.federated.buckets import make_buckets, shape_groups  # noqa: F401
from fedprune_jax.federated.packing import (  # noqa: F401
  SEQUENCE_PADDINGS,
  Bucket,
  ClientArrays,
  Example,
  pack_client,
  steps_needed,
)


class ClientStore(abc.ABC):
  """Host-side per-client data, fetched one chunk of clients at a time."""

  buckets: list[Bucket]

  @property
  @abc.abstractmethod
  def num_clients(self) -> int:
    """Clients have integer ids ``0..num_clients-1``."""

  @abc.abstractmethod
  def bucket_of(self, client_ids: np.ndarray) -> np.ndarray:
    """int[n] bucket index of each client."""

  @abc.abstractmethod
  def num_examples(self) -> np.ndarray:
    """float[num_clients] sum of example weights per client (one epoch)."""

  @abc.abstractmethod
  def get(self, client_ids: np.ndarray) -> ClientArrays:
    """Stacked ``[C, S, B, ...]`` data of clients that share one bucket.

    An id of -1 yields an all-padding client (weight 0), used to fill the
    last chunk.
    """

  def client_names(self) -> list[str]:
    return [str(i) for i in range(self.num_clients)]

  def useful_frames(self) -> np.ndarray:
    """float[num_clients] real (non-padding) frames of real examples per client, one epoch."""
    raise NotImplementedError(f"{type(self).__name__} does not count useful frames")


class InMemoryClientStore(ClientStore):
  """Packed clients kept as one stacked array per bucket and key."""

  def __init__(
    self,
    clients: Sequence[ClientArrays],
    buckets: Sequence[Bucket],
    bucket_of: Sequence[int],
    names: Sequence[str] | None = None,
  ):
    """Args: clients[i] packed to ``buckets[bucket_of[i]]`` (``pack_client``)."""
    if len(clients) != len(bucket_of):
      raise ValueError("clients and bucket_of differ in length")
    self.buckets = list(buckets)
    self._bucket_of = np.asarray(bucket_of, np.int64)
    self._row = np.zeros(len(clients), np.int64)
    self._arrays: list[ClientArrays] = []
    for b, bucket in enumerate(self.buckets):
      members = np.flatnonzero(self._bucket_of == b)
      self._row[members] = np.arange(len(members))
      template = bucket.zeros()
      stacked = {}
      for key, z in template.items():
        rows = []
        for i in members:
          if key not in clients[i] or clients[i][key].shape != z.shape:
            got = clients[i].get(key)
            raise ValueError(
              f"client {i}: field {key!r} has shape "
              f"{None if got is None else got.shape}, bucket {b} "
              f"expects {z.shape}"
            )
          rows.append(clients[i][key])
        stacked[key] = np.stack(rows) if rows else np.zeros((0,) + z.shape, z.dtype)
      self._arrays.append(stacked)
    self._num_examples = np.array([float(c["weights"].sum()) for c in clients], np.float64)
    self._names = list(names) if names is not None else None

  @classmethod
  def from_examples(
    cls,
    clients: Mapping[str, Sequence[Example]],
    batch_size: int,
    num_buckets: int = 4,
    round_to: int = 8,
  ) -> "InMemoryClientStore":
    """Buckets and packs ``{client name: [example dict, ...]}``."""
    names = list(clients)
    if not names:
      raise ValueError("no clients")
    feat_dim = None
    lengths = []
    for n in names:
      exs = clients[n]
      if not exs:
        raise ValueError(f"client {n!r} has no examples")
      feat_dim = exs[0]["features"].shape[1]
      lengths.append(
        (len(exs), max(e["features"].shape[0] for e in exs), max(len(e["labels"]) for e in exs))
      )
    buckets, bucket_of = make_buckets(
      np.array(lengths), batch_size, num_buckets, feat_dim, round_to
    )
    packed = [
      pack_client(clients[n], buckets[b], name=f"client {n!r}") for n, b in zip(names, bucket_of)
    ]
    return cls(packed, buckets, bucket_of, names)

  @property
  def num_clients(self) -> int:
    return len(self._bucket_of)

  def bucket_of(self, client_ids: np.ndarray) -> np.ndarray:
    return self._bucket_of[np.asarray(client_ids)]

  def num_examples(self) -> np.ndarray:
    return self._num_examples

  def client_names(self) -> list[str]:
    return self._names or super().client_names()

  def get(self, client_ids: np.ndarray) -> ClientArrays:
    ids = np.asarray(client_ids, np.int64)
    real = ids[ids >= 0]
    if len(real) == 0:
      raise ValueError("a chunk needs at least one real client")
    b = int(self._bucket_of[real[0]])
    if np.any(self._bucket_of[real] != b):
      raise ValueError("clients of one chunk must share a bucket")
    rows = self._row[np.where(ids >= 0, ids, real[0])]
    out = {k: v[rows] for k, v in self._arrays[b].items()}
    if np.any(ids < 0):
      pad = self.buckets[b].zeros()
      for k in out:
        out[k][ids < 0] = pad[k]
    return out

  def padding_fraction(self) -> float:
    """Fraction of padded (example, frame) slots over all clients."""
    real = slots = 0.0
    for arrays in self._arrays:
      fp = arrays["feature_paddings"]
      real += float(((1.0 - fp) * arrays["weights"][..., None]).sum())
      slots += fp.size
    return 1.0 - real / max(slots, 1.0)


class SyntheticClientStore(ClientStore):
  """Clients derived lazily from ``(seed, client_id)``; nothing is stored.

  Each client gets ``n ~ U[min_examples, max_examples]`` examples of a
  ``num_classes``-way task: features are a class prototype plus noise over a
  random number of frames, ``labels[0]`` is the class. Buckets group clients
  by their number of steps. Meant for scale benchmarks and tests.
  """

  def __init__(
    self,
    num_clients: int,
    batch_size: int = 4,
    min_examples: int = 1,
    max_examples: int = 16,
    num_frames: int = 16,
    feature_dim: int = 8,
    label_len: int = 4,
    num_classes: int = 5,
    seed: int = 0,
    num_buckets: int = 1,
  ):
    self._n = num_clients
    self.batch_size = batch_size
    self.min_examples, self.max_examples = min_examples, max_examples
    self.num_frames, self.feature_dim = num_frames, feature_dim
    self.label_len, self.num_classes = label_len, num_classes
    self.seed = seed
    self._counts = np.array([self._count(i) for i in range(num_clients)], np.int64)
    max_s = steps_needed(max_examples, batch_size)
    edges = np.unique(np.ceil(np.linspace(0, max_s, num_buckets + 1)[1:]).astype(np.int64))
    self._edges = edges
    self.buckets = [
      Bucket(int(s), batch_size, {"features": (num_frames, feature_dim), "labels": (label_len,)})
      for s in edges
    ]
    protos = np.random.default_rng([seed, 2**31 - 1])
    self._protos = protos.normal(size=(num_classes, feature_dim)).astype(np.float32)

  def _count(self, cid: int) -> int:
    return int(
      np.random.default_rng([self.seed, cid, 0]).integers(self.min_examples, self.max_examples + 1)
    )

  @property
  def num_clients(self) -> int:
    return self._n

  def bucket_of(self, client_ids: np.ndarray) -> np.ndarray:
    steps = -(-self._counts[np.asarray(client_ids)] // self.batch_size)
    return np.searchsorted(self._edges, steps)

  def num_examples(self) -> np.ndarray:
    return self._counts.astype(np.float64)

  def _generate(self, cid: int):
    """Vectorised draw of client ``cid``: (features [n,T,F] zero-padded,
    frames [n], labels [n,L] zero-padded, label lengths [n])."""
    rng = np.random.default_rng([self.seed, cid, 1])
    n, t_max, l_max = int(self._counts[cid]), self.num_frames, self.label_len
    # a per-client class skew makes clients non-IID
    pref = rng.dirichlet(np.full(self.num_classes, 0.5))
    y = rng.choice(self.num_classes, size=n, p=pref)
    frames = rng.integers(max(1, t_max // 2), t_max + 1, size=n)
    lab_len = rng.integers(1, l_max + 1, size=n)
    noise = rng.standard_normal((n, t_max, self.feature_dim), np.float32)
    feats = self._protos[y][:, None, :] + noise
    feats *= (np.arange(t_max)[None, :] < frames[:, None])[..., None]
    labels = np.where(np.arange(l_max)[None, :] < lab_len[:, None], (y + 1)[:, None], 0).astype(
      np.int32
    )
    return feats, frames, labels, lab_len

  def examples(self, cid: int) -> list[dict[str, np.ndarray]]:
    """The client's examples (deterministic in ``(seed, cid)``)."""
    feats, frames, labels, lab_len = self._generate(cid)
    return [
      {"features": feats[i, : frames[i]], "labels": labels[i, : lab_len[i]]}
      for i in range(len(frames))
    ]

  def get(self, client_ids: np.ndarray) -> ClientArrays:
    ids = np.asarray(client_ids, np.int64)
    real = ids[ids >= 0]
    if len(real) == 0:
      raise ValueError("a chunk needs at least one real client")
    b = self.bucket_of(real)
    if np.any(b != b[0]):
      raise ValueError("clients of one chunk must share a bucket")
    bucket = self.buckets[int(b[0])]
    out = bucket.zeros(len(ids))
    flat = {k: v.reshape((len(ids), bucket.slots) + v.shape[3:]) for k, v in out.items()}
    t_idx = np.arange(self.num_frames)
    l_idx = np.arange(self.label_len)
    for j, cid in enumerate(ids):
      if cid < 0:
        continue
      feats, frames, labels, lab_len = self._generate(int(cid))
      n = len(frames)
      flat["features"][j, :n] = feats
      flat["feature_paddings"][j, :n] = t_idx[None] >= frames[:, None]
      flat["labels"][j, :n] = labels
      flat["label_paddings"][j, :n] = l_idx[None] >= lab_len[:, None]
      flat["weights"][j, :n] = 1.0
    return out

  def materialize(self, client_ids: np.ndarray | None = None) -> "InMemoryClientStore":
    """An in-memory copy (ids re-numbered 0..n-1 in the given order)."""
    ids = np.arange(self._n) if client_ids is None else np.asarray(client_ids)
    packed = []
    for cid in ids:
      one = self.get(np.array([cid]))
      packed.append({k: v[0] for k, v in one.items()})
    return InMemoryClientStore(packed, self.buckets, self.bucket_of(ids), [str(i) for i in ids])


def chunk_bucket(
  client_ids: np.ndarray, bucket_of: np.ndarray, buckets: Sequence[Bucket]
) -> tuple[np.ndarray, Bucket]:
  """int64 ids of a chunk (-1 = padding client) and the one bucket its real clients share."""
  ids = np.asarray(client_ids, np.int64)
  real = ids[ids >= 0]
  b = bucket_of[real]
  if len(real) == 0 or np.any(b != b[0]):
    raise ValueError("a chunk needs real clients that share a bucket")
  return ids, buckets[int(b[0])]
