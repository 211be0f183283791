"""Tests of the native LibriSpeech directory reader on hand-made corpora."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from fedprune_jax.data import librispeech
from fedprune_jax.data.records import CorpusError

# speaker -> chapter -> [(utterance number, text)]
LAYOUT = {
  "19": {"198": [(0, "HELLO WORLD"), (1, "IT'S A TEST")]},
  "103": {"1240": [(0, "ONE"), (2, "TWO THREE")], "1241": [(0, "FOUR")]},
  "7": {"50": [(3, "SEVEN")]},
}


def _tone(n: int, freq: float) -> np.ndarray:
  """int16 [n] sine at ``freq`` Hz (16 kHz), amplitude 0.5."""
  t = np.arange(n) / 16000.0
  return np.round(0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def make_corpus(root: Path) -> dict[str, np.ndarray]:
  """Writes LAYOUT under root; returns {utt_id: int16 audio}."""
  audio = {}
  for k, (spk, chapters) in enumerate(LAYOUT.items()):
    for chap, utts in chapters.items():
      d = root / spk / chap
      d.mkdir(parents=True)
      lines = []
      for num, text in utts:
        utt_id = f"{spk}-{chap}-{num:04d}"
        x = _tone(1600 + 160 * num, 200.0 + 50 * k)
        soundfile.write(d / f"{utt_id}.flac", x, 16000, subtype="PCM_16")
        audio[utt_id] = x
        lines.append(f"{utt_id} {text}")
      (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
  return audio


@pytest.fixture
def split(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
  root = tmp_path / "train-clean-100"
  return root, make_corpus(root)


def test_reads_valid_corpus_in_natural_order(split):
  root, audio = split
  utts = list(librispeech.read_split(root))
  assert [u.utt_id for u in utts] == [
    "7-50-0003",
    "19-198-0000",
    "19-198-0001",
    "103-1240-0000",
    "103-1240-0002",
    "103-1241-0000",
  ]
  texts = {f"{s}-{c}-{n:04d}": t for s, cs in LAYOUT.items() for c, us in cs.items() for n, t in us}
  for u in utts:
    assert u.text == texts[u.utt_id]
    assert (u.speaker_id, u.chapter_id) == tuple(u.utt_id.split("-")[:2])
    assert u.sample_rate == 16000 and u.audio.dtype == np.float32
    np.testing.assert_array_equal(u.audio, audio[u.utt_id].astype(np.float32) / 32768.0)
  assert librispeech.speakers_of(root) == ["7", "19", "103"]


def test_scan_does_not_decode_and_filters_speakers(split):
  root, _ = split
  (root / "19" / "198" / "19-198-0001.flac").write_bytes(b"not a flac file")
  infos = librispeech.scan_split(root, speakers=["103", "19"])
  assert [i.utt_id for i in infos] == [
    "19-198-0000",
    "19-198-0001",
    "103-1240-0000",
    "103-1240-0002",
    "103-1241-0000",
  ]
  assert infos[1].path == root / "19" / "198" / "19-198-0001.flac"
  with pytest.raises(CorpusError, match="19-198-0001.flac: corrupt"):
    librispeech.load_utterance(infos[1])
  with pytest.raises(CorpusError, match=r"no speaker directories \['42'\]"):
    librispeech.scan_split(root, speakers=["42"])


def _flac(root: Path, utt_id: str) -> Path:
  spk, chap, _ = utt_id.split("-")
  return root / spk / chap / f"{utt_id}.flac"


def _trans(root: Path, spk: str, chap: str) -> Path:
  return root / spk / chap / f"{spk}-{chap}.trans.txt"


def _append(path: Path, line: str) -> None:
  path.write_text(path.read_text() + line + "\n")


def _break_corrupt(root):
  _flac(root, "19-198-0001").write_bytes(b"\x00garbage" * 10)
  return "19-198-0001.flac: corrupt"


def _break_truncated(root):
  p = _flac(root, "19-198-0001")
  p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
  return "19-198-0001.flac: (corrupt or )?truncated"


def _break_empty_file(root):
  _flac(root, "19-198-0001").write_bytes(b"")
  return r"19-198-0001.flac: empty audio file"


def _break_no_samples(root):
  p = _flac(root, "19-198-0001")
  soundfile.write(p, np.zeros((0,), np.int16), 16000, format="WAV")
  return "19-198-0001.flac: audio has no samples"


def _break_rate(root):
  soundfile.write(_flac(root, "19-198-0001"), _tone(800, 300.0), 8000, subtype="PCM_16")
  return "19-198-0001.flac: sample rate 8000 Hz, expected 16000"


def _break_stereo(root):
  x = np.stack([_tone(800, 300.0)] * 2, 1)
  soundfile.write(_flac(root, "19-198-0001"), x, 16000, subtype="PCM_16")
  return "19-198-0001.flac: expected mono"


def _break_missing_audio(root):
  _flac(root, "19-198-0001").unlink()
  return "198.trans.txt: transcript line for 19-198-0001 but no audio"


def _break_extra_audio(root):
  soundfile.write(
    root / "19" / "198" / "19-198-0009.flac", _tone(800, 300.0), 16000, subtype="PCM_16"
  )
  return "19-198-0009.flac: audio file without a transcript line"


def _break_bad_chars(root):
  _append(_trans(root, "19", "198"), "19-198-0002 HELLO, world")
  soundfile.write(
    root / "19" / "198" / "19-198-0002.flac", _tone(800, 300.0), 16000, subtype="PCM_16"
  )
  return r"198.trans.txt:3: characters ',dlorw' outside the alphabet"


def _break_no_text(root):
  _append(_trans(root, "19", "198"), "19-198-0002")
  return r"198.trans.txt:3: malformed line"


def _break_bad_id(root):
  _append(_trans(root, "19", "198"), "19-199-0002 HELLO")
  return r"198.trans.txt:3: malformed utterance id '19-199-0002'"


def _break_duplicate(root):
  _append(_trans(root, "19", "198"), "19-198-0001 AGAIN")
  return r"198.trans.txt:3: duplicate utterance id"


def _break_missing_trans(root):
  _trans(root, "19", "198").unlink()
  return r"19-198.trans.txt: transcript file missing"


def _break_empty_chapter(root):
  (root / "55" / "5500").mkdir(parents=True)
  (root / "55" / "5500" / "55-5500.trans.txt").write_text("")
  return r"55: speaker has no utterances"


def _break_empty_speaker(root):
  (root / "55").mkdir()
  return r"55: speaker directory has no chapter directories"


BREAKERS = [
  _break_corrupt,
  _break_truncated,
  _break_empty_file,
  _break_no_samples,
  _break_rate,
  _break_stereo,
  _break_missing_audio,
  _break_extra_audio,
  _break_bad_chars,
  _break_no_text,
  _break_bad_id,
  _break_duplicate,
  _break_missing_trans,
  _break_empty_speaker,
  _break_empty_chapter,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__[7:])
def test_strict_errors_name_the_file(split, breaker):
  root, _ = split
  pattern = breaker(root)
  with pytest.raises(CorpusError, match=pattern):
    list(librispeech.read_split(root))


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__[7:])
def test_lenient_mode_skips_and_reports(split, breaker):
  root, _ = split
  pattern = breaker(root)
  problems = []
  utts = list(librispeech.read_split(root, strict=False, problems=problems))
  assert len(problems) == 1
  assert re.search(pattern, str(problems[0]))
  ids = {u.utt_id for u in utts}
  # Every good utterance is still read.
  good = {"7-50-0003", "103-1240-0000", "103-1240-0002", "103-1241-0000"}
  if breaker is not _break_missing_trans:  # that loses the whole chapter
    good.add("19-198-0000")
  assert good <= ids
  assert ids - good <= {"19-198-0001"}


def test_missing_split_dir_and_empty_split(tmp_path):
  with pytest.raises(CorpusError, match="nope: split directory does not exist"):
    list(librispeech.read_split(tmp_path / "nope", strict=False))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CorpusError, match="empty: no speaker directories"):
    librispeech.scan_split(tmp_path / "empty")


def test_corpus_root_instead_of_split_is_explained(tmp_path):
  make_corpus(tmp_path / "LibriSpeech" / "dev-clean")
  (tmp_path / "LibriSpeech" / "SPEAKERS.TXT").write_text(";ID\n")
  with pytest.raises(CorpusError, match=r"corpus root.*\(dev-clean\)"):
    librispeech.scan_split(tmp_path / "LibriSpeech")


def test_any_rate_when_sample_rate_is_none(split):
  root, _ = split
  _break_rate(root)
  utts = {u.utt_id: u for u in librispeech.read_split(root, sample_rate=None)}
  assert utts["19-198-0001"].sample_rate == 8000
  assert utts["19-198-0000"].sample_rate == 16000


def test_validate_text_collapses_whitespace():
  assert librispeech.validate_text("  A  B\tC ", "x") == "A B C"
  with pytest.raises(CorpusError, match="where: empty transcript"):
    librispeech.validate_text("   ", "where")
