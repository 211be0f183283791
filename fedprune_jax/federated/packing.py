"""A client's examples as fixed-shape padded tensors ``[S, B, ...]`` (one shape bucket).

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
compilation serves the bucket for every round (``buckets.py`` plans a few
buckets, grouped by length, to keep the padding waste low).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

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
