"""Speakers as clients: a ClientStore over a featurised split.

Wraps ``fedprune_jax.data.batching.FeatureSet`` (all utterances' log-mel
frames + tokens, concatenated) without copying it: each speaker's examples
are padded into its bucket's ``[S, B, ...]`` tensors only when a chunk that
contains the speaker is fetched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedprune_jax.federated.client_data import ClientArrays, ClientStore, chunk_bucket, make_buckets


class SpeakerClientStore(ClientStore):
  """One client per speaker of a ``FeatureSet``.

  Args:
    feature_set: a ``batching.FeatureSet`` (or any object with its fields).
    batch_size: B.
    num_buckets: shape buckets (compilations); clients grouped by S*B*T.
    round_to: T and L are rounded up to a multiple of this.
    max_steps: optional cap on S; a speaker with more than ``max_steps * B``
      utterances keeps its first ones (the count is reported in
      ``num_truncated``).
    speakers: optional subset / order of speaker ids (default: sorted).
    max_frames: optional cap on T: longer utterances are left out (counted in
      ``num_dropped``). Within-speaker length variance dominates the padding
      (every step is padded to the bucket's T), so a cap near a high length
      percentile cuts the padding fraction a lot.
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
  ):
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
    labels = np.diff(np.asarray(fs.token_offsets))
    lengths = np.array([(len(u), frames[u].max(), labels[u].max()) for u in self._utts])
    num_features = int(np.asarray(fs.features).shape[1])
    self.buckets, self._bucket_of = make_buckets(
      lengths, batch_size, num_buckets, num_features, round_to, max_steps
    )
    self._num_examples = lengths[:, 0].astype(np.float64)
    real = sum(int(frames[u].sum()) for u in self._utts)
    slots = sum(
      self.buckets[b].slots * self.buckets[b].shapes["features"][0] for b in self._bucket_of
    )
    self._padding_fraction = 1.0 - real / slots

  @property
  def num_clients(self) -> int:
    return len(self._names)

  def client_names(self) -> list[str]:
    return list(self._names)

  def bucket_of(self, client_ids: np.ndarray) -> np.ndarray:
    return self._bucket_of[np.asarray(client_ids)]

  def num_examples(self) -> np.ndarray:
    return self._num_examples

  def padding_fraction(self) -> float:
    """1 - real frames / (S*B*T slots) over all clients and their buckets."""
    return self._padding_fraction

  def get(self, client_ids: np.ndarray) -> ClientArrays:
    ids, bucket = chunk_bucket(client_ids, self._bucket_of, self.buckets)
    out = bucket.zeros(len(ids))
    fs = self._fs
    for j, cid in enumerate(ids):
      if cid < 0:
        continue
      for k, u in enumerate(self._utts[cid]):
        s, r = divmod(k, bucket.batch_size)
        f0, f1 = fs.frame_offsets[u], fs.frame_offsets[u + 1]
        t0, t1 = fs.token_offsets[u], fs.token_offsets[u + 1]
        out["features"][j, s, r, : f1 - f0] = fs.features[f0:f1]
        out["feature_paddings"][j, s, r, : f1 - f0] = 0.0
        out["labels"][j, s, r, : t1 - t0] = fs.tokens[t0:t1]
        out["label_paddings"][j, s, r, : t1 - t0] = 0.0
        out["weights"][j, s, r] = 1.0
    return out
