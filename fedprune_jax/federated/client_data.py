"""Client datasets as fixed-shape padded tensors, grouped into shape buckets.

One client = a dict of arrays with leading axes ``[S, B]`` (S local steps of
B examples; one epoch of the client's data), in the batch layout of
docs/architecture.md plus those axes::

  features        float32 [S, B, T, F]   zero in padded frames / examples
  feature_paddings float32 [S, B, T]     1.0 = padded frame
  labels          int32   [S, B, L]
  label_paddings  float32 [S, B, L]
  weights         float32 [S, B]         0.0 = padding example

Real examples fill the steps in order (step 0 first), so padding examples sit
at the tail and steps that hold none are all-padding; the client update treats
those as exact no-ops. Every client of a bucket has the same shapes, so one
compilation serves the bucket for every round; a few buckets (grouped by
length) keep the padding waste low.

A ``ClientStore`` keeps per-client data on the host and hands out one chunk of
clients ``[C, S, B, ...]`` at a time, so host memory for a round is bounded by
the chunk size, not the cohort size.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

Example = Mapping[str, np.ndarray]
ClientArrays = dict[str, np.ndarray]

# keys whose first per-example axis is variable-length, and their padding keys
SEQUENCE_PADDINGS = {"features": "feature_paddings", "labels": "label_paddings"}


@dataclasses.dataclass(frozen=True)
class Bucket:
  """The fixed shape of every client in a bucket.

  Attributes:
    num_steps: S, local steps per epoch.
    batch_size: B.
    shapes: per-example shape per key, e.g. ``{'features': (T, 80),
      'labels': (L,)}``; the first axis of a key in ``SEQUENCE_PADDINGS`` is
      the padded length.
    dtypes: dtype name per key (default float32 for features, int32 labels).
    paddings: variable-length key -> name of its generated paddings key;
      other keys are fixed-shape and copied verbatim.
  """

  num_steps: int
  batch_size: int
  shapes: Mapping[str, tuple[int, ...]]
  dtypes: Mapping[str, str] = dataclasses.field(default_factory=dict)
  paddings: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(SEQUENCE_PADDINGS))

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(self.dtypes.get(key, "int32" if key == "labels" else "float32"))

  def zeros(self, num_clients: int | None = None) -> ClientArrays:
    """All-padding client(s): ``[S, B, ...]`` or ``[C, S, B, ...]``."""
    lead = (self.num_steps, self.batch_size)
    if num_clients is not None:
      lead = (num_clients,) + lead
    out = {}
    for key, shape in self.shapes.items():
      out[key] = np.zeros(lead + tuple(shape), self.dtype(key))
      if key in self.paddings:
        out[self.paddings[key]] = np.ones(lead + (shape[0],), np.float32)
    out["weights"] = np.zeros(lead, np.float32)
    return out

  @property
  def slots(self) -> int:
    return self.num_steps * self.batch_size


def pack_client(examples: Sequence[Example], bucket: Bucket, name: str = "client") -> ClientArrays:
  """Pads one client's examples into the bucket's ``[S, B, ...]`` tensors.

  Args:
    examples: per-example dicts with the bucket's keys (e.g. ``features``
      float32[t, F], ``labels`` int32[l]) and an optional scalar ``weight``.
    bucket: target shapes; must hold every example.
    name: used in error messages (e.g. the speaker id).

  Returns:
    dict of arrays with leading ``[S, B]``; see the module docstring.
  """
  if len(examples) > bucket.slots:
    raise ValueError(f"{name}: {len(examples)} examples exceed bucket capacity S*B={bucket.slots}")
  out = bucket.zeros()
  flat = {k: v.reshape((bucket.slots,) + v.shape[2:]) for k, v in out.items()}
  for i, ex in enumerate(examples):
    for key, shape in bucket.shapes.items():
      if key not in ex:
        raise ValueError(f"{name}: example {i} lacks field {key!r}")
      x = np.asarray(ex[key])
      if key in bucket.paddings:
        n = x.shape[0]
        if n > shape[0] or x.shape[1:] != tuple(shape[1:]):
          raise ValueError(
            f"{name}: example {i} field {key!r} has shape {x.shape}, "
            f"does not fit bucket shape {tuple(shape)}"
          )
        flat[key][i, :n] = x
        flat[bucket.paddings[key]][i, :n] = 0.0
      else:
        if x.shape != tuple(shape):
          raise ValueError(
            f"{name}: example {i} field {key!r} has shape {x.shape}, expected {tuple(shape)}"
          )
        flat[key][i] = x
    flat["weights"][i] = float(ex.get("weight", 1.0))
  return out


def steps_needed(num_examples: int, batch_size: int) -> int:
  return max(1, math.ceil(num_examples / batch_size))


def make_buckets(
  lengths: np.ndarray,
  batch_size: int,
  num_buckets: int,
  feature_dim: int,
  round_to: int = 1,
  max_steps: int | None = None,
  method: str = "cost",
) -> tuple[list[Bucket], np.ndarray]:
  """Groups clients by size into at most ``num_buckets`` shape buckets.

  Args:
    lengths: int[N, 3] per client: (#examples, max frames T, max labels L).
    batch_size: B.
    num_buckets: maximum number of buckets (compilations).
    feature_dim: F.
    round_to: T and L are rounded up to a multiple of this.
    max_steps: optional cap on S (clients beyond it must be truncated by the
      caller).
    method: ``'cost'``: clients sorted by padded cost S*B*T are cut into
      groups of equal total cost, each padded to its own maxima (S and T of a
      group may come from different clients). ``'shape'``: clients start in
      groups of identical (S, T) (after rounding), and the two groups whose
      union adds the fewest padded frame slots are merged until at most
      ``num_buckets`` remain (``shape_groups``; S and T are chosen jointly).

  Returns:
    (buckets, bucket_of) with bucket_of int[N] the bucket index per client.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.ndim != 2 or lengths.shape[1] != 3 or len(lengths) == 0:
    raise ValueError(f"lengths must be int[N>0, 3], got {lengths.shape}")
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
  steps = np.maximum(1, -(-lengths[:, 0] // batch_size))
  if max_steps is not None:
    steps = np.minimum(steps, max_steps)
  frames = -(-np.maximum(lengths[:, 1], 1) // round_to) * round_to
  labels = -(-np.maximum(lengths[:, 2], 1) // round_to) * round_to
  if method == "cost":
    group = _cost_groups(steps * np.maximum(lengths[:, 1], 1), num_buckets)
  elif method == "shape":
    group = shape_groups(np.stack([steps, frames], 1), num_buckets)
  else:
    raise ValueError(f"method must be 'cost' or 'shape', got {method!r}")
  bucket_of = np.empty(len(lengths), np.int64)
  buckets: list[Bucket] = []
  for g in np.unique(group):
    members = np.flatnonzero(group == g)
    bucket = Bucket(
      num_steps=int(steps[members].max()),
      batch_size=batch_size,
      shapes={
        "features": (int(frames[members].max()), feature_dim),
        "labels": (int(labels[members].max()),),
      },
    )
    if bucket not in buckets:  # identical shapes share one compilation
      buckets.append(bucket)
    bucket_of[members] = buckets.index(bucket)
  return buckets, bucket_of


def _cost_groups(cost: np.ndarray, num_groups: int) -> np.ndarray:
  """int[N] group of each client: equal-total-cost cuts of the cost-sorted clients."""
  order = np.argsort(cost, kind="stable")
  cum = np.cumsum(cost[order]) / cost.sum()
  group = np.empty(len(cost), np.int64)
  group[order] = np.minimum((cum * num_groups - 1e-9).astype(np.int64), num_groups - 1)
  return group


def shape_groups(shapes: np.ndarray, num_groups: int) -> np.ndarray:
  """int[N] group of each client: groups of equal shape, greedily merged.

  Args:
    shapes: int[N, 2K] per client, K (steps S_k, frames T_k) pairs (one per scan segment); a
      group is padded to its column maxima and costs (#clients) * sum_k S_k * T_k frame slots.
    num_groups: at most this many groups come back; the pair of groups whose union adds the
      fewest slots is merged until then.
  """
  keys, group = np.unique(np.asarray(shapes, np.int64), axis=0, return_inverse=True)
  group = group.reshape(-1)
  maxima = keys.astype(np.float64)  # [G, 2K] padded shape per group
  count = np.bincount(group, minlength=len(keys)).astype(np.float64)
  alive = np.ones(len(keys), bool)
  slots = lambda m: (m[..., 0::2] * m[..., 1::2]).sum(-1)
  while alive.sum() > num_groups:
    idx = np.flatnonzero(alive)
    m, n = maxima[idx], count[idx]
    own = n * slots(m)
    joint = np.maximum(m[:, None, :], m[None, :, :])
    extra = (n[:, None] + n[None, :]) * slots(joint) - own[:, None] - own[None, :]
    extra[np.diag_indices(len(idx))] = np.inf
    i, j = np.unravel_index(np.argmin(extra), extra.shape)
    maxima[idx[i]], count[idx[i]] = joint[i, j], n[i] + n[j]
    alive[idx[j]] = False
    group[group == idx[j]] = idx[i]
  return group


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


class FunctionClientStore(ClientStore):
  """Clients produced on demand by ``make_client(cid) -> examples``."""

  def __init__(
    self,
    num_clients: int,
    make_client: Callable[[int], Sequence[Example]],
    buckets: Sequence[Bucket],
    bucket_of: np.ndarray,
    num_examples: np.ndarray,
  ):
    self._n = num_clients
    self._make = make_client
    self.buckets = list(buckets)
    self._bucket_of = np.asarray(bucket_of, np.int64)
    self._num_examples = np.asarray(num_examples, np.float64)

  @property
  def num_clients(self) -> int:
    return self._n

  def bucket_of(self, client_ids: np.ndarray) -> np.ndarray:
    return self._bucket_of[np.asarray(client_ids)]

  def num_examples(self) -> np.ndarray:
    return self._num_examples

  def get(self, client_ids: np.ndarray) -> ClientArrays:
    ids, bucket = chunk_bucket(client_ids, self._bucket_of, self.buckets)
    out = bucket.zeros(len(ids))
    for j, cid in enumerate(ids):
      if cid >= 0:
        packed = pack_client(self._make(int(cid)), bucket, name=f"client {cid}")
        for k in out:
          out[k][j] = packed[k]
    return out


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
