"""The embedded synthetic multi-speaker corpus, written in LibriSpeech's layout.

``synthesize_corpus`` writes::

  OUT/SPEAKERS.TXT                                  (LibriSpeech format)
  OUT/synth_manifest.json                           (parameters + counts)
  OUT/{train,dev,test}/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt
  OUT/{train,dev,test}/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac  (16 kHz mono)

so the native LibriSpeech reader (``fedprune_jax.data.librispeech``) reads it
unchanged. Each speaker is a distinct espeak-ng voice (accent x variant,
without repetition until all 104 combinations are used) with its own pitch,
pitch range and rate, an optional noise level (SNR) and a random channel
colouring (low-pass + peaking biquad); its text follows its own topic-skewed
Zipfian word distribution (``fedprune_jax.data.text``), so clients are
non-IID in both acoustics and vocabulary. Splits are by speaker.

Determinism: every random choice derives from ``seed`` and the speaker /
utterance indices (never from worker or task order), and espeak synthesis is
pure (see ``espeak.py``), so the output is byte-identical across runs and for
any number of workers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import signal

from fedprune_jax.data import espeak
from fedprune_jax.data import text as text_lib
from fedprune_jax.data import workers as workers_lib
from fedprune_jax.data.records import SAMPLE_RATE, CorpusError

FORMAT_VERSION = 1
MANIFEST = "synth_manifest.json"
SPLITS = ("train", "dev", "test")
UTTERANCES_PER_CHAPTER = 20
# Demo defaults (the lead picks the CLI's): 48 speakers x 40 utterances.
DEFAULT_SPEAKERS = 48
DEFAULT_UTTERANCES = 40

_VOICE_STREAM = 0xB01CE
_AUDIO_STREAM = 1  # text uses stream 0 of text_lib.utterance_rng
_TASK_SIZE = 8  # utterances per worker task


@dataclasses.dataclass(frozen=True)
class SpeakerPlan:
  """How one synthetic speaker sounds.

  Attributes:
    index: global speaker index (seeds all of this speaker's randomness).
    speaker_id: LibriSpeech-style numeric id.
    split: "train", "dev" or "test".
    sex: "M" or "F" (from the espeak variant).
    voice: base espeak voice.
    snr_db: white-noise SNR in dB, or None for clean audio.
    channel_sos: float64 [sections, 6] IIR channel filter (scipy sos form).
  """

  index: int
  speaker_id: str
  split: str
  sex: str
  voice: espeak.VoiceSpec
  snr_db: float | None
  channel_sos: np.ndarray

  @property
  def description(self) -> str:
    v = self.voice
    noise = "clean" if self.snr_db is None else f"snr={self.snr_db:.0f}dB"
    return f"espeak {v.name} rate={v.rate} pitch={v.pitch} range={v.pitch_range} {noise}"


@dataclasses.dataclass(frozen=True)
class UtterancePlan:
  """One utterance to render: which speaker says what, and where it goes."""

  speaker: SpeakerPlan
  index: int  # utterance index within the speaker
  chapter_id: str
  utt_id: str
  text: str

  @property
  def rel_dir(self) -> str:
    return f"{self.speaker.split}/{self.speaker.speaker_id}/{self.chapter_id}"

  @property
  def rel_path(self) -> str:
    return f"{self.rel_dir}/{self.utt_id}.flac"


def _split_counts(num_speakers: int, fractions: Sequence[float]) -> tuple[int, int, int]:
  if len(fractions) != 3 or any(f < 0 for f in fractions):
    raise CorpusError(
      f"split_fractions={tuple(fractions)} must be 3 non-negative numbers (train, dev, test)"
    )
  if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
    raise CorpusError(f"split_fractions={tuple(fractions)} must sum to 1")
  dev, test = (max(1, round(f * num_speakers)) if f > 0 else 0 for f in fractions[1:])
  train = num_speakers - dev - test
  if fractions[0] > 0 and train < 1:
    raise CorpusError(
      f"{num_speakers} speakers are too few for split_fractions="
      f"{tuple(fractions)} (every non-empty split needs a speaker)"
    )
  return train, dev, test


def _peaking_biquad(f0: float, gain_db: float, q: float) -> np.ndarray:
  """RBJ audio-EQ-cookbook peaking filter as one sos row [6]."""
  a = 10.0 ** (gain_db / 40.0)
  w0 = 2.0 * np.pi * f0 / SAMPLE_RATE
  alpha = np.sin(w0) / (2.0 * q)
  b = np.array([1 + alpha * a, -2 * np.cos(w0), 1 - alpha * a])
  den = np.array([1 + alpha / a, -2 * np.cos(w0), 1 - alpha / a])
  return np.concatenate([b / den[0], den / den[0]])


def plan_speakers(
  *, speakers: int, seed: int, split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> list[SpeakerPlan]:
  """Voices, channels and split of ``speakers`` synthetic speakers."""
  if speakers < 1:
    raise CorpusError(f"speakers={speakers} must be >= 1")
  counts = _split_counts(speakers, split_fractions)
  order = np.random.default_rng([seed, _VOICE_STREAM]).permutation(speakers)
  split_of = np.empty((speakers,), object)
  split_of[order[: counts[0]]] = "train"
  split_of[order[counts[0] : counts[0] + counts[1]]] = "dev"
  split_of[order[counts[0] + counts[1] :]] = "test"

  variants = espeak.MALE_VARIANTS + espeak.FEMALE_VARIANTS
  combos = [(lang, var) for lang in espeak.ENGLISH_VOICES for var in variants]
  combo_order = np.random.default_rng([seed, _VOICE_STREAM, 1]).permutation(len(combos))
  plans = []
  for i in range(speakers):
    rng = np.random.default_rng([seed, i, _VOICE_STREAM])
    language, variant = combos[combo_order[i % len(combos)]]
    voice = espeak.VoiceSpec(
      language,
      variant,
      rate=int(rng.integers(140, 206)),
      pitch=int(rng.integers(25, 76)),
      pitch_range=int(rng.integers(30, 91)),
    )
    snr_db = None if rng.random() < 0.25 else float(rng.uniform(12.0, 35.0))
    lowpass = signal.butter(2, rng.uniform(3400.0, 7600.0), fs=SAMPLE_RATE, output="sos")
    eq = _peaking_biquad(rng.uniform(250.0, 3000.0), rng.uniform(-8.0, 8.0), rng.uniform(0.7, 2.0))
    plans.append(
      SpeakerPlan(
        index=i,
        speaker_id=str(1000 + i),
        split=str(split_of[i]),
        sex="F" if variant.startswith("f") else "M",
        voice=voice,
        snr_db=snr_db,
        channel_sos=np.vstack([lowpass, eq[None]]),
      )
    )
  return plans


def plan_utterances(
  speaker: SpeakerPlan, *, utterances: int, seed: int, vocab: text_lib.Vocabulary
) -> list[UtterancePlan]:
  """The speaker's ``utterances`` texts, chapters and ids."""
  texts = text_lib.speaker_sentences(vocab, seed=seed, speaker=speaker.index, count=utterances)
  num_chapters = min(99, max(1, math.ceil(utterances / UTTERANCES_PER_CHAPTER)))
  plans = []
  for c, indices in enumerate(np.array_split(np.arange(utterances), num_chapters)):
    chapter_id = str(100 * int(speaker.speaker_id) + c)
    for n, u in enumerate(indices):
      plans.append(
        UtterancePlan(
          speaker=speaker,
          index=int(u),
          chapter_id=chapter_id,
          utt_id=f"{speaker.speaker_id}-{chapter_id}-{n:04d}",
          text=texts[u],
        )
      )
  return plans


@functools.lru_cache(maxsize=1)
def _resample_filter() -> np.ndarray:
  """resample_poly's default Kaiser(5) FIR for 441 -> 320, designed once."""
  return signal.firwin(2 * 10 * 441 + 1, 1.0 / 441, window=("kaiser", 5.0))


def render_utterance(utt: UtterancePlan, seed: int) -> np.ndarray:
  """Synthesizes one utterance: float32 [n] at 16 kHz, peak in [0.3, 0.9]."""
  spk = utt.speaker
  rng = text_lib.utterance_rng(seed, spk.index, utt.index, _AUDIO_STREAM)
  voice = dataclasses.replace(
    spk.voice,
    rate=int(np.clip(spk.voice.rate + rng.integers(-8, 9), espeak.RATE_MIN, espeak.RATE_MAX)),
    pitch=int(np.clip(spk.voice.pitch + rng.integers(-3, 4), 0, 100)),
  )
  speech = espeak.synthesize(utt.text.lower(), voice)
  if not np.any(speech):
    raise espeak.EspeakError(f"espeak produced no audio for {utt.utt_id} ({utt.text!r})")
  # 22,050 Hz -> 16 kHz: 16000/22050 = 320/441.
  x = signal.resample_poly(speech.astype(np.float64), 320, 441, window=_resample_filter())
  lead, trail = (int(rng.uniform(0.05, 0.3) * SAMPLE_RATE) for _ in range(2))
  speech_power = float(np.mean(x**2))
  x = np.concatenate([np.zeros(lead), x, np.zeros(trail)])
  x = signal.sosfilt(spk.channel_sos, x)
  if spk.snr_db is not None:
    noise_std = math.sqrt(speech_power / 10.0 ** (spk.snr_db / 10.0))
    x = x + noise_std * rng.standard_normal(len(x))
  x *= rng.uniform(0.3, 0.9) / max(float(np.max(np.abs(x))), 1e-9)
  return x.astype(np.float32)


def _flac_bytes(audio: np.ndarray) -> bytes:
  import soundfile  # pylint: disable=import-outside-toplevel

  pcm = np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)
  buf = io.BytesIO()
  soundfile.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
  return buf.getvalue()


def _render_task(root: str, seed: int, utts: Sequence[UtterancePlan]) -> list[tuple[str, int]]:
  """Worker: renders and writes utterances; returns (rel_path, samples)."""
  out = []
  for utt in utts:
    audio = render_utterance(utt, seed)
    path = os.path.join(root, utt.rel_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(_flac_bytes(audio))
    out.append((utt.rel_path, len(audio)))
  return out


def _params(speakers, utterances, seed, split_fractions, vocab_size) -> dict:
  return {
    "format_version": FORMAT_VERSION,
    "speakers": int(speakers),
    "utterances": int(utterances),
    "seed": int(seed),
    "split_fractions": [float(f) for f in split_fractions],
    "vocab_size": int(vocab_size),
  }


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
  """The manifest of a complete synthetic corpus, or None if absent."""
  path = Path(out_dir) / MANIFEST
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CorpusError(f"{path}: unreadable synth manifest: {e}") from e


def _check_existing(out_dir: Path, params: dict) -> bool:
  """True if out_dir holds this exact corpus; raises if it holds another."""
  if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
    return False  # An empty directory is replaced by the rename.
  manifest = read_manifest(out_dir)
  if manifest is None:
    raise CorpusError(
      f"{out_dir} exists but is not a complete synthetic corpus (no "
      f"{MANIFEST}); remove it or pick another directory"
    )
  if manifest.get("params") != params:
    raise CorpusError(
      f"{out_dir} holds a synthetic corpus built with different parameters "
      f"{manifest.get('params')} (requested {params}); remove it or pick "
      "another directory"
    )
  return True


def _speakers_txt(speakers: Sequence[SpeakerPlan], samples: dict[str, int]) -> str:
  lines = [
    "; Synthetic speakers of fedprune_jax (espeak-ng voices), in the format",
    "; of LibriSpeech's SPEAKERS.TXT. MINUTES is the speaker's total audio.",
    ";ID  |SEX| SUBSET           |MINUTES| NAME",
  ]
  for s in speakers:
    minutes = samples.get(s.speaker_id, 0) / SAMPLE_RATE / 60.0
    lines.append(f"{s.speaker_id:<5}| {s.sex} | {s.split:<17}| {minutes:5.2f} | {s.description}")
  return "\n".join(lines) + "\n"


def speaker_accents(root: str | os.PathLike) -> dict[str, str]:
  """``{speaker id: accent}`` of a synthetic corpus, read from its ``SPEAKERS.TXT`` (the accent
  is the espeak-ng language of the speaker's voice, e.g. ``en-us``, ``en-gb-scotland``).

  Raises:
    CorpusError: the corpus has no ``SPEAKERS.TXT`` of synthetic voices (e.g. LibriSpeech).
  """
  path = Path(root) / "SPEAKERS.TXT"
  out = {}
  if path.is_file():
    for line in path.read_text(encoding="utf-8").splitlines():
      fields = [f.strip() for f in line.split("|")]
      if line.startswith(";") or len(fields) < 5 or not fields[4].startswith("espeak "):
        continue
      out[fields[0]] = fields[4].split()[1].split("+")[0]
  if not out:
    raise CorpusError(f"{path}: no synthetic voices (accents are known for synthetic corpora only)")
  return out


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
  for start in range(0, len(items), size):
    yield items[start : start + size]


def _pool_context():
  # Not "fork": the parent may run JAX/TF threads. The forkserver imports
  # this module once, so each worker starts in milliseconds.
  if "forkserver" in multiprocessing.get_all_start_methods():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx
  return multiprocessing.get_context("spawn")


def _render_all(
  root: Path,
  seed: int,
  tasks: Sequence[Sequence[UtterancePlan]],
  workers: int,
  progress_desc: str | None,
) -> list[tuple[str, int]]:
  """Renders all tasks into root (in-process if workers == 1)."""
  bar = None
  if progress_desc is not None:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(total=sum(len(t) for t in tasks), desc=progress_desc, unit="utt", file=sys.stderr)
  results: list[tuple[str, int]] = []
  try:
    if workers == 1:
      for task in tasks:
        results.extend(_render_task(str(root), seed, task))
        if bar is not None:
          bar.update(len(task))
      return results
    pool = concurrent.futures.ProcessPoolExecutor(
      workers,
      mp_context=_pool_context(),
      initializer=workers_lib.exit_with_parent,
      initargs=(os.getpid(),),
    )
    try:
      futures = [pool.submit(_render_task, str(root), seed, t) for t in tasks]
      for fut in concurrent.futures.as_completed(futures):
        done = fut.result()
        results.extend(done)
        if bar is not None:
          bar.update(len(done))
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
    pool.shutdown(wait=True)
    return results
  finally:
    if bar is not None:
      bar.close()


def _software_versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  versions = {"espeak-ng": espeak.version()}
  for package in ("wordfreq", "espeakng-loader", "soundfile", "scipy"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = "unknown"
  return versions


def _cpu_count() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def synthesize_corpus(
  out_dir: str | os.PathLike,
  *,
  speakers: int = DEFAULT_SPEAKERS,
  utterances: int = DEFAULT_UTTERANCES,
  seed: int = 0,
  split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
  workers: int | None = None,
  progress: bool = True,
  vocab_size: int = text_lib.DEFAULT_VOCAB_SIZE,
) -> Path:
  """Writes (or reuses) a synthetic corpus in LibriSpeech layout.

  Args:
    out_dir: corpus root; created atomically (built in a temporary sibling
      directory, then renamed).
    speakers: number of speakers (one federated client each).
    utterances: utterances per speaker.
    seed: seeds every random choice.
    split_fractions: (train, dev, test) fractions of the speakers; each
      non-zero fraction gets at least one speaker.
    workers: processes to render with; None = all CPUs, 1 = in-process.
    progress: show a tqdm progress bar on stderr.
    vocab_size: words in the Zipfian vocabulary.

  Returns:
    ``out_dir`` as a Path. If it already holds a corpus with the same
    parameters nothing is done; with other parameters a CorpusError is raised.
  """
  out_dir = Path(out_dir)
  if utterances < 1:
    raise CorpusError(f"utterances={utterances} must be >= 1")
  if workers is not None and workers < 1:
    raise CorpusError(f"workers={workers} must be >= 1")
  if out_dir.exists() and not out_dir.is_dir():
    raise CorpusError(f"corpus output {str(out_dir)!r} exists and is not a directory")
  params = _params(speakers, utterances, seed, split_fractions, vocab_size)
  if _check_existing(out_dir, params):
    return out_dir
  speaker_plans = plan_speakers(speakers=speakers, seed=seed, split_fractions=split_fractions)
  try:
    vocab = text_lib.build_vocabulary(vocab_size)
  except ValueError as e:
    raise CorpusError(f"vocab_size={vocab_size}: {e}") from e
  utts = [
    u
    for s in speaker_plans
    for u in plan_utterances(s, utterances=utterances, seed=seed, vocab=vocab)
  ]
  tasks = list(_chunks(utts, _TASK_SIZE))
  if workers is None:
    workers = _cpu_count()
  workers = max(1, min(workers, len(tasks)))

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  workers_lib.remove_stale_tmp_dirs(out_dir)
  tmp = out_dir.parent / (
    f".{out_dir.name}.tmp-{workers_lib.owner_tag(os.getpid())}-{uuid.uuid4().hex[:12]}"
  )
  tmp.mkdir()
  try:
    results = _render_all(tmp, seed, tasks, workers, f"synth {out_dir.name}" if progress else None)
    samples_of_utt = dict(results)
    samples_of_speaker: dict[str, int] = {}
    transcripts: dict[str, list[str]] = {}
    for u in utts:
      samples_of_speaker[u.speaker.speaker_id] = (
        samples_of_speaker.get(u.speaker.speaker_id, 0) + samples_of_utt[u.rel_path]
      )
      transcripts.setdefault(u.rel_dir, []).append(f"{u.utt_id} {u.text}")
    for rel_dir, lines in transcripts.items():
      speaker_id, chapter_id = rel_dir.split("/")[1:]
      (tmp / rel_dir / f"{speaker_id}-{chapter_id}.trans.txt").write_text("\n".join(lines) + "\n")
    (tmp / "SPEAKERS.TXT").write_text(_speakers_txt(speaker_plans, samples_of_speaker))
    manifest = {
      "format": "fedprune_jax.synth",
      "params": params,
      "files": len(utts),
      # Informational: other versions may yield other audio and texts.
      "software": _software_versions(),
      "audio_seconds": round(sum(samples_of_utt.values()) / SAMPLE_RATE, 3),
      "splits": {
        split: sorted((s.speaker_id for s in speaker_plans if s.split == split), key=int)
        for split in SPLITS
      },
    }
    # The manifest is the completeness marker: written last.
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    try:
      os.rename(tmp, out_dir)
    except OSError:
      # Lost a race with a concurrent writer: accept its identical corpus.
      if _check_existing(out_dir, params):
        shutil.rmtree(tmp, ignore_errors=True)
        return out_dir
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir
