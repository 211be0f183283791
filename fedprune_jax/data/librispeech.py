"""Native reader for LibriSpeech-layout split directories.

Works unchanged on a real LibriSpeech split (e.g.
``LibriSpeech/train-clean-100``) and on the synthetic corpus
(``fedprune_jax.data.synth``)::

  SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt   ("UTTID TEXT" per line)
  SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac   (16 kHz mono)

``scan_split`` is cheap (directory listing + transcripts, no audio decode);
``read_split`` also decodes the audio. Problems raise ``CorpusError`` naming
the file (``strict=True``), or with ``strict=False`` the bad item is skipped
and the error is appended to the caller's ``problems`` list (and logged), so a
few broken files do not stop a run over a large corpus.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from fedprune_jax.data.records import ALPHABET, SAMPLE_RATE, CorpusError
from fedprune_jax.data.records import Utterance

_ALLOWED = frozenset(ALPHABET)
_ID_RE = re.compile(r"[0-9A-Za-z_]+")
AUDIO_SUFFIX = ".flac"
TRANS_SUFFIX = ".trans.txt"


@dataclasses.dataclass(frozen=True)
class UttInfo:
  """One utterance found by ``scan_split`` (audio not decoded).

  Attributes:
    utt_id: "SPEAKER-CHAPTER-NNNN".
    speaker_id: speaker directory name.
    chapter_id: chapter directory name.
    path: the audio file.
    text: transcript (validated against ``ALPHABET``).
  """

  utt_id: str
  speaker_id: str
  chapter_id: str
  path: Path
  text: str


def _natural_key(name: str):
  return (0, int(name), name) if name.isdigit() else (1, 0, name)


def _report(problem: CorpusError, strict: bool, problems: list[CorpusError]) -> None:
  if strict:
    raise problem
  logging.warning("skipping: %s", problem)
  problems.append(problem)


_ROOT_MARKERS = ("SPEAKERS.TXT", "CHAPTERS.TXT", "synth_manifest.json")


def _check_split_dir(split_dir: Path) -> None:
  if not split_dir.exists():
    raise CorpusError(f"{split_dir}: split directory does not exist")
  if not split_dir.is_dir():
    raise CorpusError(f"{split_dir}: not a directory")
  if any((split_dir / m).is_file() for m in _ROOT_MARKERS):
    splits = ", ".join(p.name for p in _subdirs(split_dir))
    raise CorpusError(
      f"{split_dir}: this is a corpus root, not a split directory; pass one "
      f"of its splits ({splits})"
    )


def _subdirs(path: Path) -> list[Path]:
  return sorted(
    (p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
    key=lambda p: _natural_key(p.name),
  )


def speakers_of(split_dir: str | os.PathLike) -> list[str]:
  """Speaker ids (directory names) of a split, in natural order."""
  split_dir = Path(split_dir)
  _check_split_dir(split_dir)
  return [p.name for p in _subdirs(split_dir)]


def corpus_splits(root: str | os.PathLike) -> list[Path]:
  """The split directories under a corpus root (hidden ones, such as the feature cache, left
  out), or ``[root]`` when ``root`` is itself one split directory; CorpusError if it is none."""
  root = Path(root)
  if not root.is_dir():
    what = "does not exist" if not root.exists() else "is not a directory"
    raise CorpusError(f"corpus directory {str(root)!r} {what}")
  if next(root.glob("*/*/*.trans.txt"), None) is not None:
    return [root]
  return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def validate_text(text: str, where: str) -> str:
  """Returns ``text`` with whitespace runs collapsed; raises on bad chars."""
  text = " ".join(text.split())
  if not text:
    raise CorpusError(f"{where}: empty transcript")
  bad = sorted(set(text) - _ALLOWED)
  if bad:
    raise CorpusError(
      f"{where}: characters {''.join(bad)!r} outside the alphabet {ALPHABET!r} in {text!r}"
    )
  return text


def _parse_transcript(
  path: Path, speaker_id: str, chapter_id: str, strict: bool, problems: list[CorpusError]
) -> tuple[dict[str, str], set[str]]:
  """({utt_id: text} in file order, ids of rejected lines)."""
  try:
    content = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise CorpusError(f"{path}: unreadable transcript file: {e}") from e
  prefix = f"{speaker_id}-{chapter_id}-"
  out: dict[str, str] = {}
  rejected: set[str] = set()
  for lineno, line in enumerate(content.splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    parts = line.split(maxsplit=1)
    utt_id = parts[0]
    try:
      if len(parts) < 2:
        raise CorpusError(f"{where}: malformed line {line!r} (expected 'UTTID TEXT')")
      if not (utt_id.startswith(prefix) and utt_id[len(prefix) :].isdigit()):
        raise CorpusError(f"{where}: malformed utterance id {utt_id!r} (expected '{prefix}NNNN')")
      if utt_id in out:
        raise CorpusError(f"{where}: duplicate utterance id {utt_id!r}")
      out[utt_id] = validate_text(parts[1], where)
    except CorpusError as e:
      if utt_id not in out:
        rejected.add(utt_id)
      _report(e, strict, problems)
  return out, rejected


def parse_transcript(
  path: str | os.PathLike,
  speaker_id: str,
  chapter_id: str,
  *,
  strict: bool = True,
  problems: list[CorpusError] | None = None,
) -> dict[str, str]:
  """Reads one ``SPEAKER-CHAPTER.trans.txt``: {utt_id: text}, file order."""
  texts, _ = _parse_transcript(
    Path(path), speaker_id, chapter_id, strict, [] if problems is None else problems
  )
  return texts


def _scan_chapter(
  chapter_dir: Path, speaker_id: str, strict: bool, problems: list[CorpusError]
) -> list[UttInfo]:
  chapter_id = chapter_dir.name
  trans = chapter_dir / f"{speaker_id}-{chapter_id}{TRANS_SUFFIX}"
  audio = {
    p.name[: -len(AUDIO_SUFFIX)]: p
    for p in chapter_dir.iterdir()
    if p.name.endswith(AUDIO_SUFFIX) and not p.name.startswith(".")
  }
  if not trans.is_file():
    _report(
      CorpusError(f"{trans}: transcript file missing ({len(audio)} audio files in {chapter_dir})"),
      strict,
      problems,
    )
    return []
  texts, rejected = _parse_transcript(trans, speaker_id, chapter_id, strict, problems)
  infos = []
  for utt_id, text in texts.items():
    if utt_id not in audio:
      _report(
        CorpusError(
          f"{trans}: transcript line for {utt_id} but no audio file "
          f"{chapter_dir / (utt_id + AUDIO_SUFFIX)}"
        ),
        strict,
        problems,
      )
      continue
    infos.append(UttInfo(utt_id, speaker_id, chapter_id, audio[utt_id], text))
  # Audio of a rejected transcript line was reported with the line.
  for utt_id in sorted(set(audio) - set(texts) - rejected):
    _report(
      CorpusError(f"{audio[utt_id]}: audio file without a transcript line in {trans}"),
      strict,
      problems,
    )
  return infos


def scan_split(
  split_dir: str | os.PathLike,
  *,
  speakers: Iterable[str] | None = None,
  strict: bool = True,
  problems: list[CorpusError] | None = None,
) -> list[UttInfo]:
  """Lists a split's utterances (transcripts validated, audio not decoded).

  Args:
    split_dir: e.g. ``.../LibriSpeech/train-clean-100``.
    speakers: restrict to these speaker ids (each must exist).
    strict: raise on the first problem; else skip bad items.
    problems: with ``strict=False``, receives one CorpusError per skipped
      item.

  Returns:
    UttInfo records ordered by (speaker, chapter) naturally, then by the
    transcript's line order.
  """
  split_dir = Path(split_dir)
  _check_split_dir(split_dir)
  if problems is None:
    problems = []
  speaker_dirs = _subdirs(split_dir)
  if speakers is not None:
    wanted = [str(s) for s in speakers]
    present = {p.name: p for p in speaker_dirs}
    missing = [s for s in wanted if s not in present]
    if missing:
      raise CorpusError(f"{split_dir}: no speaker directories {missing}")
    speaker_dirs = [present[s] for s in sorted(set(wanted), key=_natural_key)]
  if not speaker_dirs:
    raise CorpusError(f"{split_dir}: no speaker directories")
  infos: list[UttInfo] = []
  for speaker_dir in speaker_dirs:
    if not _ID_RE.fullmatch(speaker_dir.name):
      _report(CorpusError(f"{speaker_dir}: malformed speaker directory name"), strict, problems)
      continue
    chapter_dirs = _subdirs(speaker_dir)
    if not chapter_dirs:
      _report(
        CorpusError(f"{speaker_dir}: speaker directory has no chapter directories"),
        strict,
        problems,
      )
      continue
    found = []
    reported = len(problems)
    for chapter_dir in chapter_dirs:
      found.extend(_scan_chapter(chapter_dir, speaker_dir.name, strict, problems))
    if not found and len(problems) == reported:
      _report(CorpusError(f"{speaker_dir}: speaker has no utterances"), strict, problems)
    infos.extend(found)
  return infos


def load_audio(
  path: str | os.PathLike, *, sample_rate: int | None = SAMPLE_RATE
) -> tuple[np.ndarray, int]:
  """Decodes a mono audio file: (float32 [n] in [-1, 1), sample rate).

  Raises CorpusError for missing, empty, corrupt or truncated files, for
  multi-channel audio and (unless ``sample_rate`` is None) a wrong rate.
  """
  import soundfile  # pylint: disable=import-outside-toplevel

  path = Path(path)
  if not path.is_file():
    raise CorpusError(f"{path}: audio file missing")
  if path.stat().st_size == 0:
    raise CorpusError(f"{path}: empty audio file (0 bytes)")
  try:
    with soundfile.SoundFile(str(path)) as f:
      expected, rate, channels = f.frames, f.samplerate, f.channels
      audio = f.read(dtype="float32", always_2d=True)
  except (RuntimeError, OSError, ValueError) as e:
    raise CorpusError(f"{path}: corrupt or truncated audio: {e}") from e
  if channels != 1:
    raise CorpusError(f"{path}: expected mono audio, got {channels} channels")
  if sample_rate is not None and rate != sample_rate:
    raise CorpusError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz")
  if len(audio) == 0:
    raise CorpusError(f"{path}: audio has no samples")
  if len(audio) != expected:
    raise CorpusError(
      f"{path}: truncated audio: header says {expected} samples, decoded {len(audio)}"
    )
  return audio[:, 0], rate


def load_utterance(info: UttInfo, *, sample_rate: int | None = SAMPLE_RATE) -> Utterance:
  """Decodes the audio of one scanned utterance into an ``Utterance``."""
  audio, rate = load_audio(info.path, sample_rate=sample_rate)
  return Utterance(info.utt_id, info.speaker_id, info.chapter_id, info.text, audio, rate)


def read_split(
  split_dir: str | os.PathLike,
  *,
  speakers: Iterable[str] | None = None,
  strict: bool = True,
  problems: list[CorpusError] | None = None,
  sample_rate: int | None = SAMPLE_RATE,
) -> Iterator[Utterance]:
  """Yields the split's utterances with decoded audio, in ``scan_split`` order.

  Args: as ``scan_split``; ``sample_rate`` is the required rate (None: any).
  """
  if problems is None:
    problems = []
  for info in scan_split(split_dir, speakers=speakers, strict=strict, problems=problems):
    try:
      yield load_utterance(info, sample_rate=sample_rate)
    except CorpusError as e:
      _report(e, strict, problems)
