"""Tests for fedprune_jax.models.asr (the AsrModel interface)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedprune_jax.models import asr
from fedprune_jax.models import conformer

MICRO = dict(
  d_model=32,
  num_layers=1,
  num_heads=2,
  conv_kernel=5,
  conv_groups=4,
  subsample_channels=8,
  input_dim=16,
)


def _model(**kw):
  return asr.make_asr_model("tiny", **{**MICRO, **kw})


def _batch(b=3, t=40, l=5, seed=0, frames=(40, 31, 0), labels=(5, 3, 0)):
  rng = np.random.default_rng(seed)
  fpad = np.array([[0.0] * n + [1.0] * (t - n) for n in frames], np.float32)
  lpad = np.array([[0.0] * n + [1.0] * (l - n) for n in labels], np.float32)
  feats = rng.normal(size=(b, t, 16)).astype(np.float32) * (1 - fpad)[..., None]
  return {
    "features": jnp.asarray(feats),
    "feature_paddings": jnp.asarray(fpad),
    "labels": jnp.asarray(rng.integers(1, 29, (b, l)) * (1 - lpad), jnp.int32),
    "label_paddings": jnp.asarray(lpad),
    "weights": jnp.asarray([1.0, 2.0, 0.0]),
  }


def test_make_asr_model_and_params_structure():
  m = _model()
  assert isinstance(m.config, conformer.ConformerConfig) and m.config.d_model == 32
  params = m.init(jax.random.PRNGKey(0), _batch())
  assert set(params) == {"encoder", "ctc_head"}
  assert type(params) is dict and type(params["encoder"]["block_0"]) is dict
  assert params["ctc_head"]["kernel"].shape == (32, 29)
  assert params["ctc_head"]["bias"].shape == (29,)
  assert hash(m) == hash(_model())  # usable as a static jit argument
  with pytest.raises(ValueError, match="unknown head"):
    asr.make_asr_model("tiny", head="lstm_ctc")
  with pytest.raises(KeyError, match="feature_paddings"):
    m.init(jax.random.PRNGKey(0), {"features": jnp.zeros((1, 8, 16))})
  with pytest.raises(ValueError, match="features"):
    m.init(
      jax.random.PRNGKey(0),
      {"features": jnp.zeros((1, 8, 80)), "feature_paddings": jnp.zeros((1, 8))},
    )


def test_loss_is_weighted_mean_and_ignores_padding_examples():
  m = _model()
  batch = _batch()
  params = m.init(jax.random.PRNGKey(0), batch)

  @jax.jit
  def both(p, b):
    per_ex, _ = m.per_example_loss(p, b, None, train=False)
    (val, aux), grads = jax.value_and_grad(m.loss, has_aux=True)(p, b, None, False)
    return per_ex, val, aux, grads

  per_ex, val, aux, grads = both(params, batch)
  per_ex = np.asarray(per_ex)
  assert per_ex[2] == 0.0  # all-padding example
  np.testing.assert_allclose(float(val), (per_ex[0] + 2 * per_ex[1]) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(aux["num_examples"]), 3.0)
  np.testing.assert_allclose(float(aux["loss_sum"]), per_ex[0] + 2 * per_ex[1], rtol=1e-6)
  # Garbage in a zero-weight row must change neither the loss nor the gradient.
  garbage = dict(batch)
  garbage["features"] = batch["features"].at[2].set(50.0)
  garbage["feature_paddings"] = batch["feature_paddings"].at[2].set(0.0)
  garbage["labels"] = batch["labels"].at[2].set(7)
  garbage["label_paddings"] = batch["label_paddings"].at[2].set(0.0)
  _, val2, _, grads2 = both(params, garbage)
  np.testing.assert_allclose(float(val2), float(val), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_all_zero_weights_give_zero_loss():
  m = _model()
  batch = dict(_batch(), weights=jnp.zeros((3,)))
  params = m.init(jax.random.PRNGKey(0), batch)
  val, aux = jax.jit(lambda p: m.loss(p, batch, None, False))(params)
  assert float(val) == 0.0 and float(aux["num_examples"]) == 0.0


def test_overfits_one_batch_and_decodes():
  m = _model(dropout_rate=0.0, attention_dropout_rate=0.0)
  batch = _batch(frames=(40, 36, 0), labels=(4, 3, 0))
  params = m.init(jax.random.PRNGKey(1), batch)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(p, s, key):
    (val, _), g = jax.value_and_grad(m.loss, has_aux=True)(p, batch, key, True)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, val

  state = opt.init(params)
  losses = []
  for i in range(60):
    params, state, val = step(params, state, jax.random.PRNGKey(i))
    losses.append(float(val))
  assert losses[19] < 0.5 * losses[0]  # clearly decreasing in 20 steps
  assert losses[-1] < 0.1 * losses[0]
  hyps = m.decode(params, batch)
  from fedprune_jax.data import tokenizer

  refs = tokenizer.decode_batch(np.asarray(batch["labels"]), np.asarray(batch["label_paddings"]))
  assert hyps[:2] == refs[:2] and hyps[2] == ""


def test_dropout_rng_determinism_through_loss():
  m = _model(dropout_rate=0.3)
  batch = _batch()
  params = m.init(jax.random.PRNGKey(0), batch)
  f = jax.jit(lambda k: m.loss(params, batch, k, True)[0])
  a, b, c = f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(3)), f(jax.random.PRNGKey(4))
  assert float(a) == float(b) and float(a) != float(c)
  with pytest.raises(ValueError, match="rng"):
    m.loss(params, batch, None, True)


def test_custom_head_plugs_in_without_touching_the_model():
  """A head that only implements the protocol drives loss and decode."""

  @dataclasses.dataclass(frozen=True)
  class MeanHead:
    name: str = "mean_head"

    def init(self, rng, d_model):
      return {"w": jax.random.normal(rng, (d_model,))}

    def per_example_loss(self, params, enc, enc_paddings, batch, rng, train):
      return jnp.sum((enc @ params["w"]) * (1 - enc_paddings), axis=1) ** 2

    def decode_ids(self, params, enc, enc_paddings):
      b = enc.shape[0]
      return jnp.full((b, 1), 3, jnp.int32), jnp.ones((b,), jnp.int32)

  m = asr.AsrModel(conformer.get_config("tiny", **MICRO), MeanHead())
  batch = _batch()
  params = m.init(jax.random.PRNGKey(0), batch)
  assert set(params) == {"encoder", "mean_head"}
  per_ex, _ = jax.jit(lambda p: m.per_example_loss(p, batch, None, False))(params)
  assert per_ex.shape == (3,) and float(per_ex[2]) == 0.0
  assert m.decode(params, batch) == ["A", "A", "A"]


def test_vmapped_client_grads_match_single_grads():
  """The federated engine vmaps the loss over clients; custom VJPs must batch."""
  m = _model(dropout_rate=0.2)
  batch = _batch()
  params = m.init(jax.random.PRNGKey(0), batch)
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x[::-1]]), batch)
  keys = jax.random.split(jax.random.PRNGKey(5), 2)
  grad = jax.grad(lambda p, b, k: m.loss(p, b, k)[0])
  vg = jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))(params, stacked, keys)
  one = jax.jit(grad)(params, jax.tree_util.tree_map(lambda x: x[1], stacked), keys[1])
  for a, b in zip(jax.tree_util.tree_leaves(vg), jax.tree_util.tree_leaves(one)):
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["ctc", "rnnt"])
def test_decode_with_loss_equals_decode_and_eval_loss(head):
  """Evaluation's single encoder pass gives the ids of ``decode_ids`` and the eval-mode
  ``per_example_loss``, with 0 (not inf or nan) for the zero-weight row."""
  m = _model(head=head)
  batch = _batch()
  params = m.init(jax.random.PRNGKey(3), batch)
  ids, lengths, loss = jax.jit(m.decode_with_loss)(params, batch)
  ref_ids, ref_lengths = m.decode_ids(params, batch)
  ref_loss, _ = m.per_example_loss(params, batch, None, False)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(lengths, ref_lengths)
  np.testing.assert_allclose(loss[:2], ref_loss[:2], rtol=1e-5)
  assert float(loss[2]) == 0.0


def test_evaluation_compiles_once_however_the_params_are_placed():
  """Params as fresh arrays (a restored checkpoint), as a jitted output and as host arrays give
  the same WER and loss from one compiled evaluation program (``evaluation.committed``; jit keys
  programs by placement, so each run of make demo compiled its evaluation again)."""
  from fedprune_jax import evaluation  # pylint: disable=g-import-not-at-top
  from fedprune_jax.data import feature_sets  # pylint: disable=g-import-not-at-top

  model = _model()
  rng = np.random.default_rng(0)
  frames, labels = np.array([40, 36, 30]), np.array([3, 2, 4])
  feature_set = feature_sets.FeatureSet(
    features=rng.normal(size=(frames.sum(), MICRO["input_dim"])).astype(np.float32),
    frame_offsets=np.concatenate([[0], np.cumsum(frames)]).astype(np.int64),
    tokens=rng.integers(1, 29, labels.sum()).astype(np.int32),
    token_offsets=np.concatenate([[0], np.cumsum(labels)]).astype(np.int64),
    utt_ids=np.array(["a-0", "a-1", "b-0"]),
    speaker_ids=np.array(["a", "a", "b"]),
  )
  fresh = model.init(jax.random.key(0))
  variants = (fresh, jax.jit(lambda p: jax.tree.map(lambda x: x * 1.0, p))(fresh))
  variants += (jax.tree.map(np.asarray, fresh),)
  before = evaluation._decode_with_loss._cache_size()  # pylint: disable=protected-access
  out = [evaluation.evaluate(model, p, feature_set, batch_size=4, num_buckets=1) for p in variants]
  assert evaluation._decode_with_loss._cache_size() == before + 1  # pylint: disable=protected-access
  assert all(o["wer"] == out[0]["wer"] and o["loss"] == out[0]["loss"] for o in out)
