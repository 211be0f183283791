"""Log-mel features, per-utterance normalisation and SpecAugment.

Feature definition (shared by the JAX and the NumPy path):

* frames of ``frame_length`` = 400 samples (25 ms at 16 kHz) every
  ``frame_step`` = 160 samples (10 ms), no padding at either end, so a
  waveform of N >= 400 samples gives T = 1 + (N - 400) // 160 frames (and
  T = 0 for N < 400);
* periodic Hann window (``0.5 - 0.5 cos(2 pi n / 400)``), zero-padded to
  ``fft_length`` = 512, power spectrum ``|rfft|^2`` (257 bins), no
  pre-emphasis or dither (features are a deterministic function of audio);
* 80 triangular mel filters on the **HTK** mel scale
  ``mel(f) = 2595 log10(1 + f / 700)``, triangles built in the mel domain
  with unit peak (no area normalisation), from 125 Hz to 7600 Hz; the DC bin
  gets zero weight (same matrix as ``tf.signal.linear_to_mel_weight_matrix``);
* ``log(mel + 1e-6)``.

``log_mel`` (JAX, batched, jit-able) is for device-side featurisation of
padded waveforms; ``log_mel_np`` (NumPy, one utterance) is for the host-side
data pipeline. They agree to float32 precision (tested).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """Log-mel parameters (hashable, so it can be a static jit argument)."""

  sample_rate: int = 16_000
  frame_length: int = 400
  frame_step: int = 160
  fft_length: int = 512
  num_mel_bins: int = 80
  lower_edge_hertz: float = 125.0
  upper_edge_hertz: float = 7600.0
  log_floor: float = 1e-6

  def __post_init__(self):
    if not 0 < self.frame_step <= self.frame_length <= self.fft_length:
      raise ValueError(
        f"FeatureConfig: need 0 < frame_step <= frame_length <= fft_length, got {self}"
      )
    if not (0 <= self.lower_edge_hertz < self.upper_edge_hertz <= self.sample_rate / 2):
      raise ValueError(
        f"FeatureConfig: need 0 <= lower_edge_hertz < upper_edge_hertz <= sample_rate/2, got {self}"
      )


DEFAULT_CONFIG = FeatureConfig()
NUM_MEL_BINS = DEFAULT_CONFIG.num_mel_bins


def num_frames(num_samples, config: FeatureConfig = DEFAULT_CONFIG):
  """Frames produced from ``num_samples`` samples (int or int array)."""
  t = 1 + (num_samples - config.frame_length) // config.frame_step
  if isinstance(t, jax.Array):
    return jnp.maximum(t, 0)
  return np.maximum(t, 0)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  return 2595.0 * np.log10(1.0 + hz / 700.0)


@functools.lru_cache(maxsize=16)
def mel_matrix(config: FeatureConfig = DEFAULT_CONFIG) -> np.ndarray:
  """HTK mel filterbank, float64 [fft_length // 2 + 1, num_mel_bins].

  Filter m is a triangle over mel(f) with corners at mel points m, m+1, m+2 of
  ``num_mel_bins + 2`` points equally spaced between the band edges.
  """
  num_bins = config.fft_length // 2 + 1
  bin_mel = _hz_to_mel(np.linspace(0.0, config.sample_rate / 2, num_bins))
  edges = np.linspace(
    _hz_to_mel(np.float64(config.lower_edge_hertz)),
    _hz_to_mel(np.float64(config.upper_edge_hertz)),
    config.num_mel_bins + 2,
  )
  left, center, right = edges[:-2], edges[1:-1], edges[2:]
  rising = (bin_mel[:, None] - left) / (center - left)
  falling = (right - bin_mel[:, None]) / (right - center)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights[0, :] = 0.0  # DC carries no speech information.
  return weights


@functools.lru_cache(maxsize=16)
def _hann(frame_length: int) -> np.ndarray:
  n = np.arange(frame_length)
  return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / frame_length)


def log_mel_np(
  audio: np.ndarray, sample_rate: int = 16_000, config: FeatureConfig = DEFAULT_CONFIG
) -> np.ndarray:
  """Host-side log-mel of one utterance.

  Args:
    audio: float [N] waveform.
    sample_rate: must equal ``config.sample_rate`` (no resampling here).
    config: feature parameters.

  Returns:
    float32 [T, num_mel_bins], T = ``num_frames(N)``.
  """
  if sample_rate != config.sample_rate:
    raise ValueError(
      f"log_mel_np: sample_rate {sample_rate} != feature "
      f"sample_rate {config.sample_rate}; resample first"
    )
  audio = np.asarray(audio, dtype=np.float64)
  if audio.ndim != 1:
    raise ValueError(f"log_mel_np: audio must be 1-D, got {audio.shape}")
  t = int(num_frames(audio.shape[0], config))
  if t == 0:
    return np.zeros((0, config.num_mel_bins), np.float32)
  frames = np.lib.stride_tricks.sliding_window_view(audio, config.frame_length)[
    :: config.frame_step
  ][:t]
  spec = np.fft.rfft(frames * _hann(config.frame_length), n=config.fft_length)
  power = spec.real**2 + spec.imag**2
  return np.log(power @ mel_matrix(config) + config.log_floor).astype(np.float32)


def _frame(waveforms: Array, t: int, config: FeatureConfig) -> Array:
  """[B, N] -> [B, t, frame_length] overlapping frames, using slices only.

  A frame spans ceil(frame_length / frame_step) consecutive hop-sized chunks,
  so it is a concatenation of shifted chunk views (no gather).
  """
  b, n = waveforms.shape
  step, length = config.frame_step, config.frame_length
  k = -(-length // step)
  total = (t + k - 1) * step
  if total > n:
    waveforms = jnp.pad(waveforms, ((0, 0), (0, total - n)))
  chunks = waveforms[:, :total].reshape(b, t + k - 1, step)
  frames = jnp.concatenate([chunks[:, i : i + t] for i in range(k)], axis=-1)
  return frames[..., :length]


@functools.partial(jax.jit, static_argnames=("config",))
def log_mel(
  waveforms: Array, lengths: Array, config: FeatureConfig = DEFAULT_CONFIG
) -> tuple[Array, Array]:
  """Batched log-mel of padded waveforms (jit-able, device side).

  Args:
    waveforms: float32 [B, N] waveforms, padded at the end.
    lengths: int [B] number of real samples per row.
    config: feature parameters (static).

  Returns:
    ``(features float32 [B, T, num_mel_bins], frame_paddings float32 [B, T])``
    with T = ``num_frames(N)``; padded frames (index >= num_frames(length))
    are 0 in ``features`` and 1 in ``frame_paddings``. A real frame only reads
    samples before ``lengths``, so padding content never leaks in.
  """
  waveforms = jnp.asarray(waveforms, jnp.float32)
  t = int(num_frames(waveforms.shape[1], config))
  frames = _frame(waveforms, t, config) * jnp.asarray(_hann(config.frame_length), jnp.float32)
  spec = jnp.fft.rfft(frames, n=config.fft_length)
  power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
  # HIGHEST: TPUs would otherwise run this matmul in bf16.
  mel = jnp.einsum(
    "btk,km->btm",
    power,
    jnp.asarray(mel_matrix(config), jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  feats = jnp.log(mel + config.log_floor)
  valid = jnp.arange(t)[None, :] < num_frames(jnp.asarray(lengths, jnp.int32), config)[:, None]
  feats = jnp.where(valid[..., None], feats, 0.0)
  return feats, 1.0 - valid.astype(jnp.float32)


@jax.jit
def normalize(features: Array, paddings: Array, eps: float = 1e-5) -> Array:
  """Per-utterance, per-channel mean/variance normalisation over real frames.

  Args:
    features: float [..., T, F].
    paddings: float [..., T], 1.0 = padded frame.
    eps: variance floor.

  Returns:
    float [..., T, F]: ``(x - mean) / sqrt(var + eps)`` with mean and (biased)
    variance taken over the real frames of each utterance; padded frames are
    0. An all-padding row stays 0.
  """
  w = (1.0 - paddings)[..., None]
  count = jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
  mean = jnp.sum(features * w, axis=-2, keepdims=True) / count
  var = jnp.sum(jnp.square(features - mean) * w, axis=-2, keepdims=True) / count
  return (features - mean) * jax.lax.rsqrt(var + eps) * w


def normalize_np(features: np.ndarray, eps: float = 1e-5) -> np.ndarray:
  """Host-side ``normalize`` of one unpadded utterance, float32 [T, F]."""
  x = np.asarray(features, np.float64)
  if x.shape[0] == 0:
    return np.asarray(features, np.float32)
  mean = x.mean(axis=0, keepdims=True)
  var = x.var(axis=0, keepdims=True)
  return ((x - mean) / np.sqrt(var + eps)).astype(np.float32)


def _interval_mask(starts: Array, widths: Array, size: int) -> Array:
  """bool [size]: union of [start, start + width) over the given intervals."""
  pos = jnp.arange(size)[:, None]
  return jnp.any((pos >= starts) & (pos < starts + widths), axis=-1)


def _uniform_int(key: Array, shape, maxval: Array) -> Array:
  """Uniform ints in [0, maxval] (inclusive; maxval may be traced)."""
  u = jax.random.uniform(key, shape)
  return jnp.minimum(jnp.floor(u * (maxval + 1)), maxval).astype(jnp.int32)


_SPEC_AUGMENT_STATIC = ("num_freq_masks", "max_freq_width", "num_time_masks", "max_time_width")


@functools.partial(jax.jit, static_argnames=("num_features",) + _SPEC_AUGMENT_STATIC)
def spec_augment_mask(
  key: Array,
  paddings: Array,
  num_features: int,
  *,
  num_freq_masks: int = 2,
  max_freq_width: int = 27,
  num_time_masks: int = 2,
  max_time_width: float | int = 0.05,
) -> Array:
  """SpecAugment mask, bool [B, T, F] (True = masked). See ``spec_augment``."""
  b, t = paddings.shape
  real = paddings < 0.5
  lengths = jnp.sum(real, axis=-1).astype(jnp.int32)
  f = num_features
  if isinstance(max_time_width, float):
    max_t = jnp.floor(max_time_width * lengths).astype(jnp.int32)
  else:
    max_t = jnp.minimum(jnp.int32(max_time_width), lengths)
  max_f = min(int(max_freq_width), f)

  def one(key, length, max_t):
    kfw, kfs, ktw, kts = jax.random.split(key, 4)
    fw = _uniform_int(kfw, (num_freq_masks,), jnp.int32(max_f))
    fs = _uniform_int(kfs, (num_freq_masks,), f - fw)
    tw = _uniform_int(ktw, (num_time_masks,), max_t)
    ts = _uniform_int(kts, (num_time_masks,), jnp.maximum(length - tw, 0))
    return _interval_mask(fs, fw, f)[None, :] | _interval_mask(ts, tw, t)[:, None]

  mask = jax.vmap(one)(jax.random.split(key, b), lengths, max_t)
  return mask & real[..., None]


@functools.partial(jax.jit, static_argnames=_SPEC_AUGMENT_STATIC)
def spec_augment(
  key: Array,
  features: Array,
  paddings: Array,
  *,
  num_freq_masks: int = 2,
  max_freq_width: int = 27,
  num_time_masks: int = 2,
  max_time_width: float | int = 0.05,
) -> Array:
  """SpecAugment (frequency + time masking; no time warping), pure.

  Each example draws its own masks from its own split of ``key``, so the result is a deterministic function of ``(key, inputs)``:
  * ``num_freq_masks`` bands of width ~ U{0..max_freq_width} starting at
    ~ U{0..F - width};
  * ``num_time_masks`` spans of width ~ U{0..W} with W =
    floor(max_time_width * real_length) if ``max_time_width`` is a float, else
    min(max_time_width, real_length), starting at ~ U{0..real_length - width}.
  Masked entries are set to 0 (the mean after ``normalize``). Padded frames
  are never modified. Assumes padding at the end of each row.

  Args:
    key: PRNG key.
    features: float [B, T, F].
    paddings: float [B, T], 1.0 = padded frame.

  Returns:
    float [B, T, F] augmented features.
  """
  mask = spec_augment_mask(
    key,
    paddings,
    features.shape[-1],
    num_freq_masks=num_freq_masks,
    max_freq_width=max_freq_width,
    num_time_masks=num_time_masks,
    max_time_width=max_time_width,
  )
  return jnp.where(mask, jnp.zeros((), features.dtype), features)
