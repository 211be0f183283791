"""ctypes binding to libespeak-ng, as shipped by the ``espeakng-loader`` wheel.

Only the small slice of espeak-ng's C API (``speak_lib.h``) that the synthetic
corpus needs: synchronous synthesis of one text with one voice into 16-bit PCM
at 22,050 Hz, collected through the synth callback.

Determinism. libespeak-ng keeps hidden global state between calls (for
example the pitch-flutter phase in ``wavegen.c`` is a function-level static
that ``espeak_Initialize``/``espeak_Terminate`` never reset, and parameter
changes are applied lazily), so the same text and voice give slightly
different samples depending on what was spoken before. To make
``synthesize(text, voice)`` a pure function we load a *fresh* copy of the
library for every call (``dlopen`` -> synthesize -> ``dlclose``; glibc unmaps
the library when its reference count drops to zero, which re-initialises all
statics). Two random sources are then seeded to a constant: libc's ``rand``
(used by older Klatt code) and espeak-ng's own generator, which
``espeak_ng_Initialize`` seeds with ``time(NULL)`` and which drives the breath
noise of the variants with a ``breath`` line (f2, f3, f5): without
``espeak_ng_SetRandSeed`` those voices changed from one second to the next
(issue 15). Reloading costs a few milliseconds per call (measured ~4 ms), far
less than the synthesis.

Processes. The library is a per-process singleton; a module-level lock makes
``synthesize`` safe to call from several threads (calls are serialised), and
each worker process (``spawn``/``forkserver``/``fork``) loads its own copy
lazily on first use.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import threading

import numpy as np

ESPEAK_SAMPLE_RATE = 22_050

# speak_lib.h constants.
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
espeakCHARS_AUTO = 0
espeakRATE = 1
espeakVOLUME = 2
espeakPITCH = 3
espeakRANGE = 4
EE_OK = 0

RATE_MIN, RATE_MAX = 80, 450  # words per minute (espeakRATE_MINIMUM/MAXIMUM)

# English voices ("language" entries under espeak-ng-data/lang/gmw) and the
# voice variants (espeak-ng-data/voices/!v) that give natural-sounding speech.
ENGLISH_VOICES = (
  "en-us",
  "en",
  "en-gb-scotland",
  "en-gb-x-rp",
  "en-029",
  "en-gb-x-gbclan",
  "en-gb-x-gbcwmd",
  "en-us-nyc",
)
MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8")
FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")

_CALLBACK_TYPE = ctypes.CFUNCTYPE(
  ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakError(RuntimeError):
  """libespeak-ng could not be loaded or refused a request."""


@dataclasses.dataclass(frozen=True)
class VoiceSpec:
  """One espeak-ng voice setting.

  Attributes:
    language: espeak-ng voice/accent name, e.g. "en-us", "en-gb-scotland".
    variant: voice variant, e.g. "m3" or "f2" ("" for the plain voice).
    rate: speaking rate in words per minute (80..450, 175 is espeak's normal).
    pitch: base pitch, 0..100 (50 normal).
    pitch_range: pitch range, 0..100 (0 monotone, 50 normal).
    volume: amplitude, 0..200 (100 normal).
  """

  language: str = "en-us"
  variant: str = ""
  rate: int = 175
  pitch: int = 50
  pitch_range: int = 50
  volume: int = 100

  def __post_init__(self):
    if not RATE_MIN <= self.rate <= RATE_MAX:
      raise ValueError(f"VoiceSpec.rate={self.rate} outside [{RATE_MIN}, {RATE_MAX}]")
    for field, hi in (("pitch", 100), ("pitch_range", 100), ("volume", 200)):
      value = getattr(self, field)
      if not 0 <= value <= hi:
        raise ValueError(f"VoiceSpec.{field}={value} outside [0, {hi}]")
    for field in ("language", "variant"):
      value = getattr(self, field)
      if not all(c.isalnum() or c in "-_" for c in value):
        raise ValueError(f"VoiceSpec.{field}={value!r} has invalid characters")
    if not self.language:
      raise ValueError("VoiceSpec.language must be non-empty")

  @property
  def name(self) -> str:
    """espeak-ng voice name, "language+variant" (e.g. "en-us+m3")."""
    return f"{self.language}+{self.variant}" if self.variant else self.language


_LOCK = threading.Lock()
_chunks: list[np.ndarray] = []
_callback_errors: list[str] = []


def _collect(wav, num_samples, events):  # Called from C; must not raise.
  del events
  try:
    if wav and num_samples > 0:
      _chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
  except Exception as e:  # pylint: disable=broad-except
    _callback_errors.append(repr(e))
    return 1  # abort synthesis; the caller raises
  return 0


# Keep a reference: ctypes callbacks must outlive every call into C.
_CALLBACK = _CALLBACK_TYPE(_collect)


def _reset_lock_after_fork():
  global _LOCK
  _LOCK = threading.Lock()
  _chunks.clear()
  _callback_errors.clear()


if hasattr(os, "register_at_fork"):
  os.register_at_fork(after_in_child=_reset_lock_after_fork)


def library_paths() -> tuple[str, str]:
  """(shared library path, espeak-ng-data path) from ``espeakng-loader``."""
  try:
    import espeakng_loader  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise EspeakError("espeak-ng is unavailable: pip install espeakng-loader") from e
  return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


def _open_library():
  lib_path, data_path = library_paths()
  try:
    lib = ctypes.CDLL(lib_path, mode=os.RTLD_LOCAL)
  except OSError as e:
    raise EspeakError(f"cannot load libespeak-ng from {lib_path}: {e}") from e
  lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
  lib.espeak_Initialize.restype = ctypes.c_int
  lib.espeak_SetSynthCallback.argtypes = [_CALLBACK_TYPE]
  lib.espeak_SetSynthCallback.restype = None
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  lib.espeak_SetVoiceByName.restype = ctypes.c_int
  lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  lib.espeak_SetParameter.restype = ctypes.c_int
  lib.espeak_Synth.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_uint,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint,
    ctypes.POINTER(ctypes.c_uint),
    ctypes.c_void_p,
  ]
  lib.espeak_Synth.restype = ctypes.c_int
  lib.espeak_Terminate.restype = ctypes.c_int
  if hasattr(lib, "espeak_ng_SetRandSeed"):  # espeak-ng >= 1.52; older ones use rand().
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
  sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
  if sample_rate != ESPEAK_SAMPLE_RATE:
    _close_library(lib)
    raise EspeakError(
      f"espeak_Initialize(data={data_path}) returned {sample_rate}, "
      f"expected sample rate {ESPEAK_SAMPLE_RATE}"
    )
  lib.espeak_SetSynthCallback(_CALLBACK)
  return lib


def _close_library(lib) -> None:
  import _ctypes  # pylint: disable=import-outside-toplevel

  lib.espeak_Terminate()
  _ctypes.dlclose(lib._handle)  # pylint: disable=protected-access


@functools.lru_cache(maxsize=1)
def _libc_srand():
  try:
    return ctypes.CDLL(None).srand
  except (OSError, AttributeError):  # Not a POSIX libc: best effort.
    return None


def _seed_libc_rand(seed: int) -> None:
  srand = _libc_srand()
  if srand is not None:
    srand(ctypes.c_uint(seed))


@functools.lru_cache(maxsize=1)
def variant_names() -> frozenset[str]:
  """Voice variants shipped in espeak-ng-data/voices/!v (e.g. "m3", "f2")."""
  variants_dir = os.path.join(library_paths()[1], "voices", "!v")
  try:
    return frozenset(os.listdir(variants_dir))
  except OSError as e:
    raise EspeakError(f"cannot list espeak-ng variants in {variants_dir}") from e


def synthesize_pcm(text: str, voice: VoiceSpec) -> np.ndarray:
  """Synthesizes ``text``; returns int16 [n] PCM at 22,050 Hz.

  Pure: the same (text, voice) gives the same samples in any process, in
  any call order.
  """
  if not isinstance(voice, VoiceSpec):
    raise TypeError(f"voice must be a VoiceSpec, got {type(voice).__name__}")
  if voice.variant and voice.variant not in variant_names():
    # espeak-ng silently ignores unknown variants; refuse them instead.
    raise EspeakError(f"espeak-ng has no voice variant {voice.variant!r} (voice {voice.name!r})")
  data = text.encode("utf-8") + b"\0"
  with _LOCK:
    lib = _open_library()
    try:
      _chunks.clear()
      _callback_errors.clear()
      _seed_libc_rand(1)
      if hasattr(lib, "espeak_ng_SetRandSeed"):
        lib.espeak_ng_SetRandSeed(1)
      if lib.espeak_SetVoiceByName(voice.name.encode()) != EE_OK:
        raise EspeakError(f"espeak-ng has no voice {voice.name!r}")
      for param, value in (
        (espeakRATE, voice.rate),
        (espeakPITCH, voice.pitch),
        (espeakRANGE, voice.pitch_range),
        (espeakVOLUME, voice.volume),
      ):
        if lib.espeak_SetParameter(param, value, 0) != EE_OK:
          raise EspeakError(f"espeak_SetParameter({param}, {value}) failed")
      status = lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, espeakCHARS_AUTO, None, None)
      if status != EE_OK or _callback_errors:
        raise EspeakError(
          f"espeak_Synth failed (status {status}, callback errors {_callback_errors}) on {text!r}"
        )
      pcm = np.concatenate(_chunks) if _chunks else np.zeros((0,), np.int16)
      _chunks.clear()
    finally:
      _close_library(lib)
  return pcm.astype(np.int16, copy=False)


def synthesize(text: str, voice: VoiceSpec) -> np.ndarray:
  """Synthesizes ``text`` with ``voice``.

  Returns:
    float32 [n] waveform in [-1, 1) at ``ESPEAK_SAMPLE_RATE`` (22,050 Hz).
  """
  return synthesize_pcm(text, voice).astype(np.float32) / 32768.0


def version() -> str:
  """libespeak-ng's version string (espeak_Info), e.g. "1.52.0"."""
  with _LOCK:
    lib = _open_library()
    try:
      lib.espeak_Info.argtypes = [ctypes.c_void_p]
      lib.espeak_Info.restype = ctypes.c_char_p
      return lib.espeak_Info(None).decode()
    finally:
      _close_library(lib)


def voice_exists(name: str) -> bool:
  """Whether espeak-ng accepts the voice name (e.g. "en-gb-x-rp+f3")."""
  with _LOCK:
    lib = _open_library()
    try:
      return lib.espeak_SetVoiceByName(name.encode()) == EE_OK
    finally:
      _close_library(lib)
