"""English word sequences with a Zipfian vocabulary and per-speaker topics.

The vocabulary is the top-N English words of ``wordfreq`` restricted to the
LibriSpeech alphabet, with unigram probabilities proportional to
``wordfreq.word_frequency``. To make federated clients non-IID, every word
outside the ``num_common`` most frequent ones is assigned to one of
``num_topics`` topics, and each speaker reweights the topics with a
Dirichlet draw:

  p_s(w) ∝ p(w) * ((1 - skew) + skew * K * theta_s[topic(w)]),
  theta_s ~ Dirichlet(alpha * 1_K),

so ``skew=0`` gives IID speakers and the multiplier has mean 1 over speakers
(the pooled distribution stays Zipfian). Common (function) words keep
multiplier 1. Everything is deterministic from integer seeds.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from fedprune_jax.data.records import ALPHABET

DEFAULT_VOCAB_SIZE = 2000
MIN_WORDS, MAX_WORDS = 3, 10
DEFAULT_NUM_COMMON = 150

_WORD_RE = re.compile(r"[A-Z]+(?:'[A-Z]+)?")
_VOWELS = re.compile(r"[AEIOUY]")
# Two-letter words that are real words (not abbreviations espeak would spell).
_TWO_LETTER_WORDS = frozenset(
  "TO OF IN IS IT ON BE AS AT HE BY MY OR WE AN SO ME IF UP DO NO US GO AM OH HI AH HA".split()
)
# Distinct PRNG streams: (seed, stream) or (seed, speaker, stream).
_TOPIC_STREAM = 0x70F1C
_SPEAKER_STREAM = 0x5BEA4


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
  """A Zipfian word list.

  Attributes:
    words: V upper-case words over ``ALPHABET`` (no spaces), most frequent
      first.
    probs: float64 [V] unigram probabilities (sum to 1).
    topics: int32 [V] topic of each word; -1 for common words.
    num_topics: K.
  """

  words: tuple[str, ...]
  probs: np.ndarray
  topics: np.ndarray
  num_topics: int

  def __len__(self) -> int:
    return len(self.words)


def is_speakable_word(word: str) -> bool:
  """Whether an upper-case word suits the corpus (alphabet, no acronyms)."""
  if not _WORD_RE.fullmatch(word) or not _VOWELS.search(word):
    return False
  if len(word) == 1:
    return word in ("A", "I")
  if len(word) == 2:
    return word in _TWO_LETTER_WORDS
  return True


@functools.lru_cache(maxsize=8)
def build_vocabulary(
  size: int = DEFAULT_VOCAB_SIZE,
  *,
  num_topics: int = 16,
  num_common: int | None = None,
  seed: int = 0,
) -> Vocabulary:
  """The ``size`` most frequent speakable English words (cached).

  Args:
    size: number of words V (after filtering).
    num_topics: K topics for the non-common words.
    num_common: the most frequent words shared by all topics; None =
      ``min(150, size)`` (a small vocabulary is all common words).
    seed: seeds the word -> topic assignment.
  """
  if num_common is None:
    num_common = min(DEFAULT_NUM_COMMON, size)
  if size < 1 or num_topics < 1 or not 0 <= num_common <= size:
    raise ValueError(
      f"bad vocabulary sizes: size={size}, num_topics={num_topics}, num_common={num_common}"
    )
  import wordfreq  # pylint: disable=import-outside-toplevel

  words: list[str] = []
  seen = set()
  # Over-fetch: roughly 5-10% of the top list is filtered out.
  for word in wordfreq.top_n_list("en", int(size * 1.3) + 100):
    upper = word.upper()
    if upper not in seen and is_speakable_word(upper):
      seen.add(upper)
      words.append(upper)
    if len(words) == size:
      break
  if len(words) < size:
    raise ValueError(f"wordfreq has only {len(words)} usable words (< {size})")
  freqs = np.array([wordfreq.word_frequency(w.lower(), "en") for w in words], np.float64)
  freqs = np.maximum(freqs, 1e-12)
  topics = np.full((size,), -1, np.int32)
  rng = np.random.default_rng([seed, _TOPIC_STREAM])
  rest = np.arange(num_common, size)
  topics[rest[rng.permutation(len(rest))]] = np.arange(len(rest)) % num_topics
  assert all(set(w) <= set(ALPHABET) for w in words)
  return Vocabulary(tuple(words), freqs / freqs.sum(), topics, num_topics)


def speaker_word_probs(
  vocab: Vocabulary, *, seed: int, speaker: int, skew: float = 0.8, alpha: float = 0.3
) -> np.ndarray:
  """Speaker ``speaker``'s topic-skewed unigram distribution, float64 [V]."""
  if not 0.0 <= skew <= 1.0:
    raise ValueError(f"skew={skew} must lie in [0, 1]")
  if alpha <= 0:
    raise ValueError(f"alpha={alpha} must be positive")
  k = vocab.num_topics
  theta = np.random.default_rng([seed, speaker, _SPEAKER_STREAM]).dirichlet(np.full((k,), alpha))
  multiplier = np.where(vocab.topics >= 0, (1.0 - skew) + skew * k * theta[vocab.topics], 1.0)
  p = vocab.probs * multiplier
  return p / p.sum()


def sample_sentence(
  rng: np.random.Generator,
  vocab: Vocabulary,
  word_probs: np.ndarray,
  *,
  min_words: int = MIN_WORDS,
  max_words: int = MAX_WORDS,
) -> str:
  """A sentence of ``min_words..max_words`` words drawn from ``word_probs``."""
  if not 1 <= min_words <= max_words:
    raise ValueError(f"need 1 <= min_words={min_words} <= max_words={max_words}")
  n = int(rng.integers(min_words, max_words + 1))
  ids = rng.choice(len(vocab), size=n, p=word_probs)
  return " ".join(vocab.words[i] for i in ids)


def speaker_sentences(
  vocab: Vocabulary,
  *,
  seed: int,
  speaker: int,
  count: int,
  skew: float = 0.8,
  alpha: float = 0.3,
  min_words: int = MIN_WORDS,
  max_words: int = MAX_WORDS,
) -> list[str]:
  """``count`` sentences of one speaker; sentence i uses RNG (seed, speaker, i).

  Sentence i does not depend on ``count`` (prefix-stable).
  """
  probs = speaker_word_probs(vocab, seed=seed, speaker=speaker, skew=skew, alpha=alpha)
  return [
    sample_sentence(
      utterance_rng(seed, speaker, i), vocab, probs, min_words=min_words, max_words=max_words
    )
    for i in range(count)
  ]


def utterance_rng(seed: int, speaker: int, utterance: int, stream: int = 0) -> np.random.Generator:
  """The Generator for one utterance's random choices (text: stream 0)."""
  return np.random.default_rng([seed, speaker, utterance, stream])
