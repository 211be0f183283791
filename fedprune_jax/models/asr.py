"""Head-agnostic ASR model: Conformer encoder + a pluggable output head.

``AsrModel`` is what the trainer and the federated engine see.  Its ``loss``
is the ``loss_fn(params, batch, rng) -> (scalar, aux)`` they differentiate;
nothing in it is CTC specific.  A head (``CtcHead``, or ``RnntHead`` from
``fedprune_jax.models.transducer``) implements the small ``Head`` protocol and
owns ``params[head.name]``.

Batch format (docs/architecture.md): ``features`` f32[B, T, 80],
``feature_paddings`` f32[B, T], ``labels`` i32[B, L], ``label_paddings``
f32[B, L], ``weights`` f32[B] (0 = padding example; defaults to ones).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedprune_jax.models import conformer
from fedprune_jax.models import ctc
from fedprune_jax.models import transducer

Array = jax.Array
Params = dict[str, Any]
Batch = Mapping[str, Array]


class Head(Protocol):
  """What an output head provides (params live under ``params[name]``)."""

  name: str

  def init(self, rng: Array, d_model: int) -> Params:
    """Fresh head params for encoder width ``d_model``."""

  def per_example_loss(
    self,
    params: Params,
    enc: Array,
    enc_paddings: Array,
    batch: Batch,
    rng: Array | None,
    train: bool,
  ) -> Array:
    """enc f32[B, T', d], enc_paddings f32[B, T'] -> f32[B] loss."""

  def decode_ids(self, params: Params, enc: Array, enc_paddings: Array) -> tuple[Array, Array]:
    """Greedy hypotheses: (ids i32[B, N] left-compacted, -1 padded; lengths i32[B])."""

  # Optional: heads with frame-level outputs (CTC) also provide
  #   logits(params, enc f32[B, T', d]) -> f32[B, T', V]
  # and heads with a search (RNN-T) provide
  #   beam_search(params, enc, enc_paddings, beam) -> list of B label-id lists.


@dataclasses.dataclass(frozen=True)
class CtcHead:
  """Linear projection d -> V, CTC loss, best-path decoding."""

  vocab_size: int = 29
  name: str = "ctc_head"

  def _dense(self) -> nn.Dense:
    return nn.Dense(self.vocab_size)

  def init(self, rng: Array, d_model: int) -> Params:
    shapes = jax.eval_shape(
      lambda r: self._dense().init(r, jnp.zeros((1, d_model), jnp.float32)), rng
    )
    return flax.core.unfreeze(conformer.init_from_shapes(shapes["params"], rng))

  def logits(self, params: Params, enc: Array) -> Array:
    """enc f32[B, T', d] -> logits f32[B, T', V]."""
    return self._dense().apply({"params": params}, enc)

  def per_example_loss(self, params, enc, enc_paddings, batch, rng, train):
    del rng, train  # no stochastic layers in the CTC head
    return ctc.ctc_loss(
      self.logits(params, enc), enc_paddings, batch["labels"], batch["label_paddings"]
    )

  def decode_ids(self, params, enc, enc_paddings):
    return ctc.greedy_decode(self.logits(params, enc), enc_paddings)


HEADS = {"ctc": CtcHead, "rnnt": transducer.RnntHead}


def _check_batch(batch: Batch, cfg: conformer.ConformerConfig, need_labels: bool):
  keys = ["features", "feature_paddings"] + (["labels", "label_paddings"] if need_labels else [])
  for k in keys:
    if k not in batch:
      raise KeyError(f"batch is missing field {k!r} (has {sorted(batch)})")
  f = batch["features"]
  if f.ndim != 3 or f.shape[-1] != cfg.input_dim:
    raise ValueError(f'batch["features"]: expected [B, T, {cfg.input_dim}], got {f.shape}')
  if batch["feature_paddings"].shape != f.shape[:2]:
    raise ValueError(
      f'batch["feature_paddings"]: expected {f.shape[:2]}, got {batch["feature_paddings"].shape}'
    )
  if need_labels:
    lab, lp = batch["labels"], batch["label_paddings"]
    if lab.ndim != 2 or lab.shape != lp.shape or lab.shape[0] != f.shape[0]:
      raise ValueError(
        f'batch["labels"] {lab.shape} / batch["label_paddings"] '
        f"{lp.shape}: expected both [B={f.shape[0]}, L]"
      )
  if "weights" in batch and batch["weights"].shape != f.shape[:1]:
    raise ValueError(f'batch["weights"]: expected [{f.shape[0]}], got {batch["weights"].shape}')


@dataclasses.dataclass(frozen=True)
class AsrModel:
  """Conformer encoder + head.  Hashable, so it can be a static jit argument.

  params = {'encoder': <ConformerEncoder params>, head.name: <head params>}.
  """

  config: conformer.ConformerConfig
  head: Any = CtcHead()

  @property
  def encoder(self) -> conformer.ConformerEncoder:
    return conformer.ConformerEncoder(self.config)

  def init(self, rng: Array, batch: Batch | None = None) -> Params:
    """Fresh params (plain nested dicts).  ``batch`` is only shape-checked."""
    if batch is not None:
      _check_batch(batch, self.config, need_labels=False)
    enc_rng, head_rng = jax.random.split(rng)
    return {
      "encoder": self.init_encoder(enc_rng),
      self.head.name: self.head.init(head_rng, self.config.d_model),
    }

  def init_encoder(self, rng: Array) -> Params:
    """Encoder params with Flax's default initial values (fast to compile)."""
    cfg = self.config
    dummy = jnp.zeros((1, 8, cfg.input_dim), jnp.float32)
    shapes = jax.eval_shape(
      lambda r: self.encoder.init({"params": r}, dummy, jnp.zeros((1, 8)), False), rng
    )
    return flax.core.unfreeze(conformer.init_from_shapes(shapes["params"], rng))

  def apply_features(
    self,
    params: Params,
    features: Array,
    paddings: Array,
    rng: Array | None = None,
    train: bool = False,
  ):
    """Encoder forward: f32[B, T, F], f32[B, T] -> (f32[B, T', d], f32[B, T'])."""
    if train and rng is None:
      raise ValueError("train=True needs an rng for dropout")
    rngs = {"dropout": rng} if train else {}
    return self.encoder.apply({"params": params["encoder"]}, features, paddings, train, rngs=rngs)

  def per_example_loss(
    self, params: Params, batch: Batch, rng: Array | None = None, train: bool = True
  ) -> tuple[Array, dict[str, Array]]:
    """-> (loss f32[B], aux {'enc_lengths': f32[B]})."""
    _check_batch(batch, self.config, need_labels=True)
    if rng is not None:
      enc_rng, head_rng = jax.random.split(rng)
    else:
      enc_rng = head_rng = None
    enc, enc_pad = self.apply_features(
      params, batch["features"], batch["feature_paddings"], enc_rng, train
    )
    loss = self.head.per_example_loss(params[self.head.name], enc, enc_pad, batch, head_rng, train)
    return loss, {"enc_lengths": jnp.sum(1.0 - enc_pad, axis=1)}

  def loss(
    self, params: Params, batch: Batch, rng: Array | None = None, train: bool = True
  ) -> tuple[Array, dict[str, Array]]:
    """Weighted mean loss sum(w*l)/max(sum(w), 1) and aux scalars.

    aux: 'num_examples' = sum(w), 'loss_sum' = sum(w*l).
    """
    per_ex, _ = self.per_example_loss(params, batch, rng, train)
    w = batch.get("weights")
    w = jnp.ones_like(per_ex) if w is None else w.astype(jnp.float32)
    # Zero-weight rows are padding; keep their (possibly huge) loss out of the sum.
    per_ex = jnp.where(w > 0, per_ex, 0.0)
    loss_sum = jnp.sum(w * per_ex)
    n = jnp.sum(w)
    return loss_sum / jnp.maximum(n, 1.0), {"num_examples": n, "loss_sum": loss_sum}

  def logits(self, params: Params, batch: Batch) -> tuple[Array, Array]:
    """Frame-level head outputs (CTC): (f32[B, T', V], paddings f32[B, T'])."""
    if not hasattr(self.head, "logits"):
      raise TypeError(f"head {self.head.name!r} has no frame-level logits")
    _check_batch(batch, self.config, need_labels=False)
    enc, enc_pad = self.apply_features(params, batch["features"], batch["feature_paddings"])
    return self.head.logits(params[self.head.name], enc), enc_pad

  def decode_ids(self, params: Params, batch: Batch) -> tuple[Array, Array]:
    """Greedy ids i32[B, N] (-1 padded) and lengths i32[B]; jit-able."""
    _check_batch(batch, self.config, need_labels=False)
    enc, enc_pad = self.apply_features(params, batch["features"], batch["feature_paddings"])
    return self.head.decode_ids(params[self.head.name], enc, enc_pad)

  def decode_with_loss(self, params: Params, batch: Batch) -> tuple[Array, Array, Array]:
    """One encoder pass for evaluation: greedy ids i32[B, N] (-1 padded), their lengths i32[B]
    and the loss without dropout f32[B] (0 for zero-weight rows, whose CTC loss may be inf);
    jit-able."""
    _check_batch(batch, self.config, need_labels=True)
    enc, enc_pad = self.apply_features(params, batch["features"], batch["feature_paddings"])
    head_params = params[self.head.name]
    ids, lengths = self.head.decode_ids(head_params, enc, enc_pad)
    loss = self.head.per_example_loss(head_params, enc, enc_pad, batch, None, False)
    weights = batch.get("weights")
    if weights is not None:
      loss = jnp.where(weights > 0, loss, 0.0)
    return ids, lengths, loss

  def decode(self, params: Params, batch: Batch) -> list[str]:
    """Greedy transcripts (host side; the device part is jitted)."""
    ids, lengths = _decode_ids_jit(self, params, batch["features"], batch["feature_paddings"])
    return ctc.ids_to_strings(ids, lengths)

  def beam_decode(self, params: Params, batch: Batch, beam: int = 4) -> list[str]:
    """Beam-search transcripts, for heads with a ``beam_search`` (RNN-T; host loop, slow)."""
    if not hasattr(self.head, "beam_search"):
      raise TypeError(f"head {self.head.name!r} has no beam search")
    _check_batch(batch, self.config, need_labels=False)
    enc, enc_pad = _encode_jit(self, params, batch["features"], batch["feature_paddings"])
    hyps = self.head.beam_search(params[self.head.name], enc, enc_pad, beam)
    width = max((len(h) for h in hyps), default=0)
    ids = np.array([h + [-1] * (width - len(h)) for h in hyps], np.int32).reshape(len(hyps), width)
    return ctc.ids_to_strings(ids, [len(h) for h in hyps])


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(model: AsrModel, params: Params, features: Array, paddings: Array):
  return model.apply_features(params, features, paddings)


@functools.partial(jax.jit, static_argnums=0)
def _decode_ids_jit(
  model: AsrModel, params: Params, features: Array, paddings: Array
) -> tuple[Array, Array]:
  return model.decode_ids(params, {"features": features, "feature_paddings": paddings})


def make_asr_model(
  config_or_preset: str | conformer.ConformerConfig = "tiny",
  vocab_size: int = 29,
  head: str = "ctc",
  head_options: Mapping[str, Any] | None = None,
  **config_overrides,
) -> AsrModel:
  """Builds an ``AsrModel`` from a preset name ('tiny', 's', 'm', 'l') or config.

  ``head`` is 'ctc' or 'rnnt'; ``head_options`` are fields of its dataclass
  (e.g. ``{'predictor': 'stateless'}`` for ``RnntHead``).
  ``config_overrides`` replace ConformerConfig fields (e.g. dropout_rate=0.0).
  """
  cfg = conformer.get_config(config_or_preset, **config_overrides)
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
  return AsrModel(cfg, HEADS[head](vocab_size=vocab_size, **dict(head_options or {})))
