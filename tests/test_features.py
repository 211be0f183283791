"""Tests for fedprune_jax.data.features (log-mel, normalisation, SpecAugment)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

from fedprune_jax.data import features as F

SR = 16_000


def _audio(n: int, seed: int = 0) -> np.ndarray:
  """Noise + two tones, float32 [n] (loud and quiet bins both present)."""
  rng = np.random.default_rng(seed)
  t = np.arange(n) / SR
  x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3000 * t)
  return (x + 0.05 * rng.normal(size=n)).astype(np.float32)


def test_mel_matrix_matches_tensorflow_values():
  # Nonzero entries of filters 0, 40, 79 from
  # tf.signal.linear_to_mel_weight_matrix(80, 257, 16000, 125., 7600.,
  # dtype=tf.float64) (an independent HTK-mel implementation).
  expected = {
    0: ([5], [0.6955455640594551]),
    40: (
      [61, 62, 63, 64],
      [0.35862518808135746, 0.7768158706048827, 0.8099192467541099, 0.4014654732212494],
    ),
    79: (
      list(range(229, 244)),
      [
        0.07217231209578098,
        0.2114570638691018,
        0.3501910639008403,
        0.48837865054374474,
        0.6260241110909008,
        0.7631316825737164,
        0.8997055525446452,
        0.9642501401554643,
        0.8287313046448004,
        0.6937338972623776,
        0.5592539208441751,
        0.4252874240128718,
        0.29183050048129716,
        0.15887928836889365,
        0.026429969531245545,
      ],
    ),
  }
  m = F.mel_matrix()
  assert m.shape == (257, 80)
  for j, (rows, vals) in expected.items():
    np.testing.assert_array_equal(np.flatnonzero(m[:, j]), rows)
    np.testing.assert_allclose(m[rows, j], vals, rtol=1e-12)
  assert np.all(m[0] == 0)  # DC bin
  assert np.all(m.max(axis=0) <= 1.0)


@pytest.mark.parametrize(
  "n,t", [(0, 0), (399, 0), (400, 1), (559, 1), (560, 2), (16_000, 98), (16_079, 98), (16_080, 99)]
)
def test_num_frames(n, t):
  assert F.num_frames(n) == t == F.log_mel_np(np.zeros(n, np.float32)).shape[0]


def test_log_mel_np_matches_scipy_stft():
  x = _audio(4000)
  win = scipy.signal.get_window("hann", 400)  # periodic Hann
  _, _, z = scipy.signal.stft(
    x.astype(np.float64),
    fs=SR,
    window=win,
    nperseg=400,
    noverlap=240,
    nfft=512,
    boundary=None,
    padded=False,
    detrend=False,
  )
  power = np.abs(z.T * win.sum()) ** 2  # undo scipy's 1/sum(window) scaling
  ref = np.log(power @ F.mel_matrix() + 1e-6)
  got = F.log_mel_np(x, SR)
  assert got.shape == ref.shape == (1 + (4000 - 400) // 160, 80)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)


def test_log_mel_np_matches_direct_dft_on_one_frame():
  x = _audio(2000, seed=3).astype(np.float64)
  t = 5
  frame = x[t * 160 : t * 160 + 400]
  n = np.arange(400)
  frame = frame * (0.5 - 0.5 * np.cos(2 * np.pi * n / 400))
  k = np.arange(257)[:, None]
  dft = (frame * np.exp(-2j * np.pi * k * n / 512)).sum(axis=1)
  ref = np.log(np.abs(dft) ** 2 @ F.mel_matrix() + 1e-6)
  np.testing.assert_allclose(F.log_mel_np(x, SR)[t], ref, atol=1e-4, rtol=1e-5)


def test_log_mel_np_rejects_other_sample_rates():
  with pytest.raises(ValueError, match="sample_rate 8000"):
    F.log_mel_np(np.zeros(1000), 8000)


def test_jax_log_mel_matches_numpy_and_ignores_padding_content():
  lengths = np.array([3000, 2345, 800, 399], np.int32)
  n = 3000
  wav = np.stack([_audio(n, seed=i) for i in range(4)])
  garbage = wav.copy()
  for i, l in enumerate(lengths):
    garbage[i, l:] = 1e3  # anything beyond the length must not leak in
  feats, pad = F.log_mel(jnp.asarray(garbage), jnp.asarray(lengths))
  t_max = 1 + (n - 400) // 160
  assert feats.shape == (4, t_max, 80) and pad.shape == (4, t_max)
  feats, pad = np.asarray(feats), np.asarray(pad)
  for i, l in enumerate(lengths):
    ref = F.log_mel_np(wav[i, :l], SR)
    t = ref.shape[0]
    np.testing.assert_array_equal(pad[i], np.arange(t_max) >= t)
    np.testing.assert_allclose(feats[i, :t], ref, atol=2e-3, rtol=1e-4)
    assert np.all(feats[i, t:] == 0)


def test_jax_log_mel_short_batch_and_vmap():
  wav = jnp.asarray(np.stack([_audio(500), _audio(500, 1)]))
  feats, pad = F.log_mel(wav, jnp.array([500, 450]))
  assert feats.shape == (2, 1, 80)
  np.testing.assert_array_equal(pad, 0.0)
  # vmapping single-example calls gives the batched result.
  one = jax.vmap(lambda w, l: F.log_mel(w[None], l[None])[0][0])(wav, jnp.array([500, 450]))
  np.testing.assert_allclose(one, feats, atol=1e-5)


def _reference_normalize(x, length):
  real = x[:length].astype(np.float64)
  out = np.zeros_like(x, dtype=np.float64)
  if length:
    out[:length] = (real - real.mean(0)) / np.sqrt(real.var(0) + 1e-5)
  return out


def test_normalize_over_real_frames_only():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, size=(3, 20, 8)).astype(np.float32)
  lengths = [20, 7, 0]
  pad = (np.arange(20)[None] >= np.array(lengths)[:, None]).astype(np.float32)
  x_garbage = np.where(pad[..., None] > 0, 99.0, x).astype(np.float32)
  got = np.asarray(F.normalize(jnp.asarray(x_garbage), jnp.asarray(pad)))
  for i, l in enumerate(lengths):
    np.testing.assert_allclose(got[i], _reference_normalize(x[i], l), atol=1e-5)
  np.testing.assert_allclose(F.normalize_np(x[1, :7]), got[1, :7], atol=1e-5)
  # Unbatched use works the same (leading dims are free).
  np.testing.assert_allclose(F.normalize(x[1], pad[1]), got[1], atol=1e-6)


def _mask_structure(mask_real):
  """Split a [t, F] real-frame mask into fully masked columns and rows."""
  cols = mask_real.all(axis=0)
  rows = mask_real.all(axis=1)
  return cols, rows


def _runs(v):
  """(start, width) of the True runs of a bool vector."""
  d = np.diff(np.concatenate([[0], v.astype(int), [0]]))
  starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
  return list(zip(starts, ends - starts))


def test_spec_augment_structure_padding_and_determinism():
  b, t, f = 16, 120, 80
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, t, f)).astype(np.float32) + 5.0  # no exact zeros
  lengths = rng.integers(40, t + 1, size=b)
  lengths[0] = t
  pad = (np.arange(t)[None] >= lengths[:, None]).astype(np.float32)
  key = jax.random.key(42)
  aug_fn = jax.jit(lambda k, x, p: F.spec_augment(k, x, p))
  out = np.asarray(aug_fn(key, x, pad))
  np.testing.assert_array_equal(out, np.asarray(aug_fn(key, x, pad)))
  assert not np.array_equal(out, np.asarray(aug_fn(jax.random.key(43), x, pad)))
  masked = out == 0
  np.testing.assert_array_equal(out[~masked], x[~masked])
  for i, l in enumerate(lengths):
    assert not masked[i, l:].any(), "padded frames must never be touched"
    cols, rows = _mask_structure(masked[i, :l])
    np.testing.assert_array_equal(masked[i, :l], cols[None] | rows[:, None])
    # <= 2 bands of width <= 27 (two bands may overlap or touch and merge).
    assert len(_runs(cols)) <= 2 and cols.sum() <= 2 * 27
    assert all(w <= 2 * 27 for _, w in _runs(cols))
    # <= 2 time spans of width <= floor(0.05 * length).
    w_max = int(np.floor(0.05 * l))
    assert len(_runs(rows)) <= 2 and rows.sum() <= 2 * w_max


def test_spec_augment_width_distribution_and_int_time_width():
  # One freq mask, no time masks: width ~ U{0..27} -> mean 13.5.
  b, t, f = 4000, 4, 80
  pad = jnp.zeros((b, t))
  m = np.asarray(F.spec_augment_mask(jax.random.key(0), pad, f, num_freq_masks=1, num_time_masks=0))
  widths = m[:, 0, :].sum(axis=1)
  assert widths.min() == 0 and widths.max() == 27
  assert abs(widths.mean() - 13.5) < 0.6
  assert m[:, 0, 0].any() and m[:, 0, -1].any()  # both edges reachable
  assert (m == m[:, :1, :]).all()  # same band in every frame
  # Integer max_time_width: absolute frames, capped at the real length.
  t = 30
  lengths = np.tile([30, 3], 200)
  pad = jnp.asarray((np.arange(t)[None] >= lengths[:, None]).astype(np.float32))
  m = np.asarray(
    F.spec_augment_mask(
      jax.random.key(1), pad, 8, num_freq_masks=0, num_time_masks=1, max_time_width=10
    )
  )
  assert not m[1::2, 3:].any()
  widths = m[:, :, 0].sum(axis=1).reshape(200, 2)
  assert widths[:, 0].max() == 10 and widths[:, 1].max() == 3
  # No masks at all is the identity.
  y = jnp.arange(2 * t * 8, dtype=jnp.float32).reshape(2, t, 8) + 1
  np.testing.assert_array_equal(
    F.spec_augment(jax.random.key(1), y, pad[:2], num_freq_masks=0, num_time_masks=0), y
  )


def test_spec_augment_vmaps_over_keys():
  x = jnp.ones((2, 50, 80))
  pad = jnp.zeros((2, 50))
  keys = jax.random.split(jax.random.key(0), 3)
  out = jax.vmap(lambda k: F.spec_augment(k, x, pad))(keys)
  assert out.shape == (3, 2, 50, 80)
  for j in range(3):
    np.testing.assert_array_equal(out[j], F.spec_augment(keys[j], x, pad))
