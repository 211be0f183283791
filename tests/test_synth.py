"""Tests of the word sampler and the synthetic corpus writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedprune_jax.data import librispeech
from fedprune_jax.data import synth
from fedprune_jax.data import text as text_lib
from fedprune_jax.data import workers
from fedprune_jax.data.records import ALPHABET, SAMPLE_RATE, CorpusError

SPEAKERS, UTTERANCES, SEED = 4, 3, 0


# ----------------------------------------------------------------- text.py


@pytest.fixture(scope="module")
def vocab():
  return text_lib.build_vocabulary(500, num_topics=8, num_common=50)


def test_vocabulary_is_zipfian_and_in_alphabet(vocab):
  import wordfreq

  assert len(vocab) == 500 and len(set(vocab.words)) == 500
  assert all(set(w) <= set(ALPHABET) - {" "} for w in vocab.words)
  assert all(text_lib.is_speakable_word(w) for w in vocab.words)
  assert vocab.words[0] == "THE"
  np.testing.assert_allclose(vocab.probs.sum(), 1.0)
  expected = np.array([wordfreq.word_frequency(w.lower(), "en") for w in vocab.words])
  np.testing.assert_allclose(vocab.probs, expected / expected.sum())
  # Topics: the 50 common words have none, the others are balanced over 8.
  assert np.all(vocab.topics[:50] == -1)
  np.testing.assert_array_equal(
    np.bincount(vocab.topics[50:]), np.full(8, 450 // 8) + (np.arange(8) < 450 % 8)
  )


def test_small_vocabulary_is_all_common_words():
  small = text_lib.build_vocabulary(30)
  assert len(small) == 30 and small.words[:3] == ("THE", "TO", "AND")
  assert np.all(small.topics == -1)  # default num_common = min(150, size)
  big = text_lib.build_vocabulary(500, num_topics=8, num_common=50)
  assert big.words[:30] == small.words  # the same top of the list


def test_is_speakable_word():
  for good in ("A", "I", "TO", "DON'T", "HELLO"):
    assert text_lib.is_speakable_word(good), good
  for bad in ("S", "TV", "HTTP", "'TIS", "DON'", "A1", "MR", "hello"):
    assert not text_lib.is_speakable_word(bad), bad


def test_speaker_probs_match_formula_and_skew(vocab):
  k = vocab.num_topics
  theta = np.random.default_rng([7, 3, text_lib._SPEAKER_STREAM]).dirichlet(np.full(k, 0.3))
  mult = np.where(vocab.topics >= 0, 0.2 + 0.8 * k * theta[vocab.topics], 1.0)
  expected = vocab.probs * mult / np.sum(vocab.probs * mult)
  got = text_lib.speaker_word_probs(vocab, seed=7, speaker=3, skew=0.8, alpha=0.3)
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  np.testing.assert_allclose(
    text_lib.speaker_word_probs(vocab, seed=7, speaker=3, skew=0.0), vocab.probs, rtol=1e-12
  )
  # Non-IID: speakers' distributions are far apart in total variation.
  p = [text_lib.speaker_word_probs(vocab, seed=7, speaker=s) for s in range(4)]
  tv = [0.5 * np.abs(p[i] - p[j]).sum() for i in range(4) for j in range(i)]
  assert min(tv) > 0.1
  with pytest.raises(ValueError, match="skew"):
    text_lib.speaker_word_probs(vocab, seed=0, speaker=0, skew=1.5)


def test_sentences_deterministic_prefix_stable_and_bounded(vocab):
  a = text_lib.speaker_sentences(vocab, seed=1, speaker=2, count=40)
  b = text_lib.speaker_sentences(vocab, seed=1, speaker=2, count=10)
  assert a[:10] == b
  assert a != text_lib.speaker_sentences(vocab, seed=1, speaker=3, count=40)
  lengths = [len(s.split(" ")) for s in a]
  assert min(lengths) >= text_lib.MIN_WORDS
  assert max(lengths) <= text_lib.MAX_WORDS
  assert all(w in vocab.words for s in a for w in s.split(" "))


# ---------------------------------------------------------------- synth.py


def test_split_counts_and_speaker_plans():
  assert synth._split_counts(48, (0.8, 0.1, 0.1)) == (38, 5, 5)
  assert synth._split_counts(4, (0.8, 0.1, 0.1)) == (2, 1, 1)
  assert synth._split_counts(3, (1.0, 0.0, 0.0)) == (3, 0, 0)
  with pytest.raises(ValueError, match="sum to 1"):
    synth._split_counts(10, (0.5, 0.1, 0.1))
  with pytest.raises(ValueError, match="too few"):
    synth._split_counts(2, (0.8, 0.1, 0.1))
  plans = synth.plan_speakers(speakers=120, seed=3)
  combos = [(p.voice.language, p.voice.variant) for p in plans]
  assert len(set(combos[:104])) == 104  # no voice repeats before all are used
  assert [p.split for p in plans].count("dev") == 12
  assert {p.sex for p in plans} == {"M", "F"}


def _tree_bytes(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("synth") / "corpus"
  synth.synthesize_corpus(
    out, speakers=SPEAKERS, utterances=UTTERANCES, seed=SEED, workers=1, progress=False
  )
  return out


def test_layout_manifest_and_speakers_txt(corpus):
  plans = synth.plan_speakers(speakers=SPEAKERS, seed=SEED)
  manifest = synth.read_manifest(corpus)
  assert manifest["files"] == SPEAKERS * UTTERANCES
  assert manifest["params"]["seed"] == SEED
  flacs = sorted(corpus.rglob("*.flac"))
  assert len(flacs) == SPEAKERS * UTTERANCES
  for p in plans:
    chapter = str(100 * int(p.speaker_id))
    d = corpus / p.split / p.speaker_id / chapter
    assert (d / f"{p.speaker_id}-{chapter}.trans.txt").is_file()
    for n in range(UTTERANCES):
      assert (d / f"{p.speaker_id}-{chapter}-{n:04d}.flac").is_file()
  assert sorted(x.name for x in corpus.iterdir()) == [
    "SPEAKERS.TXT",
    "dev",
    "synth_manifest.json",
    "test",
    "train",
  ]
  # SPEAKERS.TXT parses the way TFDS parses LibriSpeech's.
  rows = {}
  for line in (corpus / "SPEAKERS.TXT").read_text().splitlines():
    if not line.startswith(";"):
      fields = [f.strip() for f in line.split("|", 5)]
      rows[fields[0]] = fields[1:]
  assert set(rows) == {p.speaker_id for p in plans}
  for p in plans:
    sex, subset, minutes, name = rows[p.speaker_id]
    assert (sex, subset) == (p.sex, p.split)
    assert float(minutes) > 0 and p.voice.name in name
  # Splits are speaker-disjoint and match the manifest.
  for split in synth.SPLITS:
    assert librispeech.speakers_of(corpus / split) == manifest["splits"][split]


def _read_all(corpus: Path):
  return [u for split in synth.SPLITS for u in librispeech.read_split(corpus / split)]


def _norm_log_spectrum(x: np.ndarray) -> np.ndarray:
  n = 512
  frames = np.lib.stride_tricks.sliding_window_view(x, n)[::256] * np.hanning(n)
  energy = (frames**2).mean(1)
  spec = np.abs(np.fft.rfft(frames[energy > 0.1 * energy.max()])) ** 2
  s = np.log(spec.mean(0) + 1e-10)[:200]  # 0..6.25 kHz
  return s - s.mean()


def test_read_back_audio_and_transcripts(corpus):
  utts = _read_all(corpus)
  assert len(utts) == SPEAKERS * UTTERANCES
  vocab = text_lib.build_vocabulary(text_lib.DEFAULT_VOCAB_SIZE)
  expected = {}
  for plan in synth.plan_speakers(speakers=SPEAKERS, seed=SEED):
    for u in synth.plan_utterances(plan, utterances=UTTERANCES, seed=SEED, vocab=vocab):
      expected[u.utt_id] = u.text
  assert {u.utt_id: u.text for u in utts} == expected
  for u in utts:
    assert u.sample_rate == SAMPLE_RATE and u.audio.dtype == np.float32
    assert 0.5 < u.duration_s < 8.0
    assert np.sqrt(np.mean(u.audio**2)) > 0.01  # non-silent
    assert 0.29 < np.abs(u.audio).max() < 0.91  # peak-normalised
  # Distinct voices: every utterance's nearest neighbour in (level-normalised)
  # long-term spectrum is an utterance of the same speaker.
  feats = np.stack([_norm_log_spectrum(u.audio) for u in utts])
  dist = ((feats[:, None] - feats[None]) ** 2).mean(-1)
  np.fill_diagonal(dist, np.inf)
  speakers = [u.speaker_id for u in utts]
  assert all(speakers[i] == speakers[j] for i, j in enumerate(dist.argmin(1)))


def test_render_matches_written_audio(corpus):
  plan = synth.plan_speakers(speakers=SPEAKERS, seed=SEED)[1]
  vocab = text_lib.build_vocabulary(text_lib.DEFAULT_VOCAB_SIZE)
  utt = synth.plan_utterances(plan, utterances=UTTERANCES, seed=SEED, vocab=vocab)[2]
  audio = synth.render_utterance(utt, SEED)
  written, _ = librispeech.load_audio(corpus / utt.rel_path)
  np.testing.assert_allclose(written, audio, atol=1.0 / 32768 + 1e-7)


def test_cached_resample_filter_equals_scipy_default():
  from scipy import signal

  x = np.random.default_rng(0).standard_normal(3000)
  np.testing.assert_array_equal(
    signal.resample_poly(x, 320, 441),
    signal.resample_poly(x, 320, 441, window=synth._resample_filter()),
  )


def test_deterministic_across_runs_and_worker_counts(corpus, tmp_path):
  other = synth.synthesize_corpus(
    tmp_path / "c2", speakers=SPEAKERS, utterances=UTTERANCES, seed=SEED, workers=2, progress=False
  )
  assert _tree_bytes(other) == _tree_bytes(corpus)
  third = synth.synthesize_corpus(
    tmp_path / "c3",
    speakers=SPEAKERS,
    utterances=UTTERANCES,
    seed=SEED + 1,
    workers=1,
    progress=False,
  )
  assert _tree_bytes(third) != _tree_bytes(corpus)


def test_rerun_is_noop_and_other_params_error(corpus, monkeypatch):
  before = _tree_bytes(corpus)

  def boom(*args, **kwargs):
    raise AssertionError("re-run must not render anything")

  monkeypatch.setattr(synth, "render_utterance", boom)
  assert (
    synth.synthesize_corpus(
      corpus, speakers=SPEAKERS, utterances=UTTERANCES, seed=SEED, workers=1, progress=False
    )
    == corpus
  )
  assert _tree_bytes(corpus) == before
  with pytest.raises(CorpusError, match="different parameters"):
    synth.synthesize_corpus(
      corpus, speakers=SPEAKERS, utterances=UTTERANCES, seed=SEED + 5, workers=1, progress=False
    )


def test_existing_foreign_dir_is_an_error(tmp_path):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "notes.txt").write_text("mine")
  with pytest.raises(CorpusError, match="not a complete synthetic corpus"):
    synth.synthesize_corpus(
      tmp_path / "c", speakers=2, utterances=1, split_fractions=(1, 0, 0), workers=1, progress=False
    )


def test_failure_leaves_no_partial_output(tmp_path, monkeypatch):
  real = synth.render_utterance
  calls = []

  def flaky(utt, seed):
    calls.append(utt.utt_id)
    if len(calls) == 3:
      raise RuntimeError("disk on fire")
    return real(utt, seed)

  monkeypatch.setattr(synth, "render_utterance", flaky)
  with pytest.raises(RuntimeError, match="disk on fire"):
    synth.synthesize_corpus(
      tmp_path / "c", speakers=2, utterances=2, split_fractions=(1, 0, 0), workers=1, progress=False
    )
  assert list(tmp_path.iterdir()) == []  # neither the corpus nor a temp dir


def test_manifest_is_valid_json(corpus):
  data = json.loads((corpus / synth.MANIFEST).read_text())
  assert data["format"] == "fedprune_jax.synth"
  assert data["audio_seconds"] > 0


def test_stale_tmp_dirs_of_dead_writers_are_removed(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  dead_pid = int(dead.stdout)
  out = tmp_path / "c"
  stale = tmp_path / f".c.tmp-{workers.owner_tag(dead_pid)}-0123456789ab"
  live = tmp_path / f".c.tmp-{workers.owner_tag(os.getpid())}-0123456789ab"
  other_host = tmp_path / f".c.tmp-otherhost_{dead_pid}-0123456789ab"
  for d in (stale, live, other_host):
    (d / "train").mkdir(parents=True)
  synth.synthesize_corpus(
    out, speakers=2, utterances=1, split_fractions=(1, 0, 0), workers=1, progress=False
  )
  assert not stale.exists()
  assert live.exists() and other_host.exists()  # a running writer's, another host's: kept


def test_kill_9_leaves_no_worker_processes_and_the_next_run_cleans_up(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import psutil  # pylint: disable=g-import-not-at-top

  out = tmp_path / "c"
  argv = ["corpus", "synth", "--out", str(out), "--speakers", "4", "--utterances", "24"]
  proc = subprocess.Popen(
    [sys.executable, "-m", "fedprune_jax.cli", *argv, "--workers", "2", "--quiet"],
    stdout=subprocess.DEVNULL,  # orphans holding a pipe would block this test, not fail it
    stderr=subprocess.DEVNULL,
  )
  descendants = []
  try:
    deadline = time.time() + 60
    while not list(tmp_path.glob(".c.tmp-*/*/*/*/*.flac")):  # workers are rendering
      assert time.time() < deadline and proc.poll() is None
      time.sleep(0.05)
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert len(descendants) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(descendants, timeout=10)
    assert alive == []
  finally:
    for p in descendants:  # never leave processes behind, whatever failed above
      try:
        p.kill()
      except psutil.Error:
        pass
  assert len(list(tmp_path.glob(".c.tmp-*"))) == 1
  synth.synthesize_corpus(out, speakers=4, utterances=1, workers=1, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
