"""Tests of the libespeak-ng ctypes binding (short texts only)."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import re
import threading

import numpy as np
import pytest

from fedprune_jax.data import espeak

TEXT = "hello world this is a test"


def _f0(x: np.ndarray, sr: int = espeak.ESPEAK_SAMPLE_RATE) -> float:
  """Median autocorrelation pitch (Hz) over the loud 30 ms frames."""
  n = int(0.03 * sr)
  frames = np.lib.stride_tricks.sliding_window_view(x, n)[:: n // 2]
  energy = (frames**2).mean(1)
  lo, hi = sr // 400, sr // 50
  pitches = []
  for f in frames[energy > 0.3 * energy.max()]:
    f = f - f.mean()
    ac = np.correlate(f, f, "full")[n - 1 :]
    pitches.append(sr / (lo + np.argmax(ac[lo:hi])))
  return float(np.median(pitches))


def test_synthesize_returns_float_waveform():
  x = espeak.synthesize(TEXT, espeak.VoiceSpec("en-us", "m3"))
  assert x.dtype == np.float32 and x.ndim == 1
  # ~6 words at 175 wpm: between 1 and 4 seconds of 22,050 Hz audio.
  assert 1.0 < len(x) / espeak.ESPEAK_SAMPLE_RATE < 4.0
  assert np.all(np.abs(x) < 1.0)
  assert np.sqrt(np.mean(x**2)) > 0.01  # not silent
  # Exactly the int16 PCM scaled by 1/32768.
  pcm = espeak.synthesize_pcm(TEXT, espeak.VoiceSpec("en-us", "m3"))
  np.testing.assert_array_equal(x, pcm.astype(np.float32) / 32768.0)


def test_synthesize_is_pure_across_calls():
  # libespeak keeps hidden state between utterances; the binding reloads the
  # library so a call never depends on earlier calls.
  voice = espeak.VoiceSpec("en-us", "m3")
  first = espeak.synthesize_pcm(TEXT, voice)
  espeak.synthesize_pcm(
    "something else entirely", espeak.VoiceSpec("en-029", "f2", rate=260, pitch=80, pitch_range=10)
  )
  second = espeak.synthesize_pcm(TEXT, voice)
  np.testing.assert_array_equal(first, second)


def test_voice_parameters_change_pitch_and_duration():
  low = espeak.synthesize(TEXT, espeak.VoiceSpec("en-us", "m1", pitch=10))
  high = espeak.synthesize(TEXT, espeak.VoiceSpec("en-us", "m1", pitch=90))
  assert _f0(high) > 1.3 * _f0(low)
  male = espeak.synthesize(TEXT, espeak.VoiceSpec("en-us", "m1"))
  female = espeak.synthesize(TEXT, espeak.VoiceSpec("en-us", "f1"))
  assert _f0(female) > 1.3 * _f0(male)
  slow = espeak.synthesize(TEXT, espeak.VoiceSpec("en-us", "m1", rate=120))
  fast = espeak.synthesize(TEXT, espeak.VoiceSpec("en-us", "m1", rate=300))
  assert len(slow) > 1.6 * len(fast)


def test_voice_spec_validation_and_name():
  assert espeak.VoiceSpec("en-gb-x-rp", "f3").name == "en-gb-x-rp+f3"
  assert espeak.VoiceSpec("en").name == "en"
  with pytest.raises(ValueError, match="rate"):
    espeak.VoiceSpec(rate=50)
  with pytest.raises(ValueError, match="pitch"):
    espeak.VoiceSpec(pitch=101)
  with pytest.raises(ValueError, match="pitch_range"):
    espeak.VoiceSpec(pitch_range=-1)
  with pytest.raises(ValueError, match="language"):
    espeak.VoiceSpec("en us")


def test_unknown_voice_is_an_error():
  assert not espeak.voice_exists("xx-nonexistent")
  with pytest.raises(espeak.EspeakError, match="xx-nonexistent"):
    espeak.synthesize("hello", espeak.VoiceSpec("xx-nonexistent"))
  with pytest.raises(espeak.EspeakError, match="variant 'zz9'"):
    espeak.synthesize("hello", espeak.VoiceSpec("en-us", "zz9"))
  with pytest.raises(TypeError):
    espeak.synthesize("hello", "en-us")


def test_all_listed_english_voices_exist():
  assert re.fullmatch(r"\d+\.\d+.*", espeak.version())
  for language in espeak.ENGLISH_VOICES:
    assert espeak.voice_exists(language), language
  variants = espeak.MALE_VARIANTS + espeak.FEMALE_VARIANTS
  assert set(variants) <= espeak.variant_names()


def _worker(text: str, voice: espeak.VoiceSpec) -> bytes:
  return espeak.synthesize_pcm(text, voice).tobytes()


def test_threads_and_spawned_process_match_serial():
  voices = [espeak.VoiceSpec("en-us", "m3"), espeak.VoiceSpec("en", "f4")]
  serial = [espeak.synthesize_pcm("one two three", v).tobytes() for v in voices]
  results = [None, None]

  def run(i):
    results[i] = espeak.synthesize_pcm("one two three", voices[i]).tobytes()

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == serial
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
    result = pool.submit(_worker, "one two three", voices[1]).result()
  assert result == serial[1]


_HASH_EVERY_VARIANT = """
import hashlib, sys
from fedprune_jax.data import espeak
voices = [espeak.VoiceSpec("en-us", v) for v in espeak.MALE_VARIANTS + espeak.FEMALE_VARIANTS]
voices += [espeak.VoiceSpec(lang, "f5") for lang in espeak.ENGLISH_VOICES]
for voice in voices:
  pcm = espeak.synthesize_pcm("sea breeze", voice)
  print(voice.name, hashlib.sha256(pcm.tobytes()).hexdigest())
"""


def test_every_variant_is_identical_across_processes_and_seconds():
  # espeak-ng seeds its noise generator with time(NULL): two processes started in different
  # seconds gave different breathy (f2, f3, f5) voices before the generator was seeded.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  def run() -> str:
    proc = subprocess.run(
      [sys.executable, "-c", _HASH_EVERY_VARIANT], capture_output=True, text=True, check=True
    )
    return proc.stdout

  start = time.time()
  first = run()
  time.sleep(max(0.0, 1.1 - (time.time() - start)))
  second = run()
  names = [line.split()[0] for line in first.splitlines()]
  assert set(names) >= {f"en-us+{v}" for v in espeak.FEMALE_VARIANTS + espeak.MALE_VARIANTS}
  assert first == second
