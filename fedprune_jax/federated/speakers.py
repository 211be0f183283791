"""Speakers as clients: a ClientStore over a featurised split.

Wraps ``fedprune_jax.data.feature_sets.FeatureSet`` (all utterances' log-mel
frames + tokens, concatenated) without copying it: each speaker's examples
are padded into its bucket's ``[S, B, ...]`` tensors only when a chunk that
contains the speaker is fetched.

Where the padding comes from (issue 14; the 160 x 50 synthetic corpus, B = 8):
a client's local steps run in one ``lax.scan``, so every step is padded to the
longest utterance of the speaker (or of its bucket). Within-speaker length
variance alone costs 38 % of the frame slots, the partial last step 11 %;
bucketing speakers more finely can only approach that floor (0.46). Hence
``segments``: the speaker's utterances are sorted by length and its steps cut
into K scan segments of their own length T_k (short steps first), which a
client update (``client.make_client_update``, given the tuple of segments) runs one after the
other, carrying the optimizer state: one epoch, every utterance once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedprune_jax.federated.buckets import make_buckets, shape_groups
from fedprune_jax.federated.client_data import ClientStore, chunk_bucket
from fedprune_jax.federated.packing import Bucket, ClientArrays


class SpeakerClientStore(ClientStore):
  """One client per speaker of a ``FeatureSet``.

  Args:
    feature_set: a ``feature_sets.FeatureSet`` (or any object with its fields).
    batch_size: B.
    num_buckets: shape buckets (compilations).
    round_to: T and L are rounded up to a multiple of this.
    max_steps: optional cap on S; a speaker with more than ``max_steps * B``
      utterances keeps its first ones (the count is reported in
      ``num_truncated``).
    speakers: optional subset / order of speaker ids (default: sorted).
    max_frames: optional cap on T: longer utterances are left out (counted in
      ``num_dropped``).
    packing: how speakers are grouped into buckets (``buckets.make_buckets``
      ``method``): ``'cost'`` (equal-cost cuts, before issue 14) or ``'shape'``
      (greedy merging of equal (S, T) groups; ignored with ``segments > 1``,
      which always groups by shape).
    segments: K. 1: ``get`` returns one dict of ``[C, S, B, ...]`` arrays,
      utterances in feature-set order. K > 1: utterances sorted by length
      (the partial step holds the shortest), steps cut into K consecutive
      segments of about S/K steps, and ``get`` returns a tuple of K such dicts,
      each padded to its own T_k; a segment with no step of data gets one
      all-padding step. ``buckets[b]`` is then a tuple of K ``Bucket``s.
  """

  def __init__(
    self,
    feature_set,
    batch_size: int,
    num_buckets: int = 4,
    round_to: int = 16,
    max_steps: int | None = None,
    speakers: Sequence[str] | None = None,
    max_frames: int | None = None,
    packing: str = "shape",
    segments: int = 1,
  ):
    if segments < 1:
      raise ValueError(f"segments must be >= 1, got {segments}")
    fs = feature_set
    self._fs = fs
    frames = np.diff(np.asarray(fs.frame_offsets))
    index = {}
    self.num_dropped = 0
    for i, s in enumerate(np.asarray(fs.speaker_ids)):
      if max_frames is not None and frames[i] > max_frames:
        self.num_dropped += 1
        continue
      index.setdefault(str(s), []).append(i)
    names = sorted(index) if speakers is None else [str(s) for s in speakers]
    missing = [s for s in names if s not in index]
    if missing:
      raise ValueError(
        f"speakers not in the feature set (or with no utterance under max_frames): {missing[:5]}"
      )
    if not names:
      raise ValueError("the feature set has no speakers")
    cap = None if max_steps is None else max_steps * batch_size
    self._utts = [np.array(index[s][:cap], np.int64) for s in names]
    self.num_truncated = sum(len(index[s]) - len(u) for s, u in zip(names, self._utts))
    self._names = names
    self.segments = segments
    labels = np.diff(np.asarray(fs.token_offsets))
    num_features = int(np.asarray(fs.features).shape[1])
    self._useful = np.array([frames[u].sum() for u in self._utts], np.float64)
    self._num_examples = np.array([len(u) for u in self._utts], np.float64)
    if segments == 1:
      lengths = np.array([(len(u), frames[u].max(), labels[u].max()) for u in self._utts])
      buckets, self._bucket_of = make_buckets(
        lengths, batch_size, num_buckets, num_features, round_to, max_steps, method=packing
      )
      self.buckets = buckets
      # (segment, step, row) of each utterance: in order, B per step
      self._slots = [_rows(np.arange(len(u)), batch_size, 0) for u in self._utts]
      slots = [
        self.buckets[b].slots * self.buckets[b].shapes["features"][0] for b in self._bucket_of
      ]
    else:
      self._utts = [u[np.argsort(frames[u], kind="stable")] for u in self._utts]
      plans = [segment_plan(frames[u], batch_size, segments, round_to) for u in self._utts]
      group = shape_groups(np.array([p[0] for p in plans]), num_buckets)
      self._slots = [p[1] for p in plans]
      self._bucket_of = np.empty(len(plans), np.int64)
      self.buckets = []
      for g in np.unique(group):
        members = np.flatnonzero(group == g)
        shape = np.array([plans[i][0] for i in members]).max(0)
        max_l = -(-int(max(labels[self._utts[i]].max() for i in members)) // round_to) * round_to
        seg = tuple(
          Bucket(
            int(shape[2 * k]),
            batch_size,
            {
              "features": (int(shape[2 * k + 1]), num_features),
              "labels": (max_l,),
            },
          )
          for k in range(segments)
        )
        self._bucket_of[members] = len(self.buckets)
        self.buckets.append(seg)
      slots = [
        sum(b.slots * b.shapes["features"][0] for b in self.buckets[g]) for g in self._bucket_of
      ]
    self._padding_fraction = 1.0 - self._useful.sum() / float(np.sum(slots))

  @property
  def num_clients(self) -> int:
    return len(self._names)

  def client_names(self) -> list[str]:
    return list(self._names)

  def bucket_of(self, client_ids: np.ndarray) -> np.ndarray:
    return self._bucket_of[np.asarray(client_ids)]

  def num_examples(self) -> np.ndarray:
    return self._num_examples

  def useful_frames(self) -> np.ndarray:
    return self._useful

  def padding_fraction(self) -> float:
    """1 - real frames / (S*B*T slots, summed over segments) over all clients."""
    return self._padding_fraction

  def utterances(self, client_id: int) -> np.ndarray:
    """int64 feature-set indices of the client's utterances, in packing order."""
    return self._utts[client_id]

  def get(self, client_ids: np.ndarray) -> ClientArrays | tuple[ClientArrays, ...]:
    ids, bucket = chunk_bucket(client_ids, self._bucket_of, self.buckets)
    seg_buckets = (bucket,) if self.segments == 1 else bucket
    outs = [b.zeros(len(ids)) for b in seg_buckets]
    fs = self._fs
    for j, cid in enumerate(ids):
      if cid < 0:
        continue
      for u, (k, s, r) in zip(self._utts[cid], self._slots[cid]):
        out = outs[k]
        f0, f1 = fs.frame_offsets[u], fs.frame_offsets[u + 1]
        t0, t1 = fs.token_offsets[u], fs.token_offsets[u + 1]
        out["features"][j, s, r, : f1 - f0] = fs.features[f0:f1]
        out["feature_paddings"][j, s, r, : f1 - f0] = 0.0
        out["labels"][j, s, r, : t1 - t0] = fs.tokens[t0:t1]
        out["label_paddings"][j, s, r, : t1 - t0] = 0.0
        out["weights"][j, s, r] = 1.0
    return outs[0] if self.segments == 1 else tuple(outs)


def _rows(positions: np.ndarray, batch_size: int, segment: int) -> np.ndarray:
  """int64[n, 3] (segment, step, row) of examples at flat slot ``positions``."""
  s, r = np.divmod(positions, batch_size)
  return np.stack([np.full_like(s, segment), s, r], 1)


def segment_plan(
  frames: np.ndarray, batch_size: int, segments: int, round_to: int
) -> tuple[np.ndarray, np.ndarray]:
  """Cuts one client's length-sorted examples into K scan segments.

  Args:
    frames: int[n] frame counts, ascending.
    batch_size: B.
    segments: K.
    round_to: T_k is rounded up to a multiple of this.

  Returns:
    (shape int[2K]: (S_k, T_k) per segment, slots int64[n, 3]: (segment, step, row) per
    example). Steps hold B examples except the first, which holds the n mod B shortest (so
    only the cheapest step is partial); segment k holds steps ``[k*S//K, (k+1)*S//K)``. A
    segment without steps gets one all-padding step of T = round_to.
  """
  n = len(frames)
  num_steps = max(1, -(-n // batch_size))
  first = n - (num_steps - 1) * batch_size  # examples of the partial step 0
  step = np.where(np.arange(n) < first, 0, (np.arange(n) - first) // batch_size + 1)
  row = np.where(step == 0, np.arange(n), (np.arange(n) - first) % batch_size)
  cuts = [k * num_steps // segments for k in range(segments + 1)]
  seg = np.searchsorted(cuts, step, side="right") - 1
  shape = np.empty(2 * segments, np.int64)
  for k in range(segments):
    mine = frames[seg == k]
    shape[2 * k] = max(1, cuts[k + 1] - cuts[k])
    shape[2 * k + 1] = -(-max(1, int(mine.max()) if len(mine) else 1) // round_to) * round_to
  cut_of = np.asarray(cuts)[seg]
  return shape, np.stack([seg, step - cut_of, row], 1).astype(np.int64)
