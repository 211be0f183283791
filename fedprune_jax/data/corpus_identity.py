"""A corpus's identity: what a cached result depends on, wherever the corpus lies.

A suite run is keyed by its config, and the config names the corpus by its path, so a corpus
rebuilt at the same path with other contents (another seed, vocabulary or speaker count; a
LibriSpeech copy with files missing) would let a cached result stand in for a run on the new
corpus. So a run records the identity of the corpus it read (``results.json``, ``corpus``) and
the suite refuses a finished run whose corpus is no longer the one at its path
(``suite.check_corpora``).

The identity hashes each split's file list (paths relative to the split), the files' sizes and
the transcripts' contents, and the root's ``SPEAKERS.TXT`` (the accents that ``T6``'s server split
reads). Not modification times: a corpus synthesized again byte for byte on a new machine keeps
its identity. Not the audio bytes either, which would mean reading the whole corpus (60 GB for
LibriSpeech) at each start: a re-rendered audio file of the same size goes unseen. The feature
cache's fingerprint (``feature_sets.split_fingerprint``) adds the mtimes to the same walk, so it
notices such a file; a run's start (``job``) lists its train split once for both
(``walk_once``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from typing import Any, Iterator, Mapping, Sequence

from fedprune_jax.data.records import CorpusError

SPEAKERS_FILE = "SPEAKERS.TXT"  # the corpus' speaker metadata (sex, subset, accent)


_Entry = tuple  # (relative path, size, mtime_ns, sha256 of a *.txt file's content or None)
_listings: contextvars.ContextVar[dict[str, tuple[_Entry, ...]] | None] = contextvars.ContextVar(
  "split_listings", default=None
)


@contextlib.contextmanager
def walk_once() -> Iterator[None]:
  """Within it, each split directory is walked once and its listing reused (by
  ``hash_split``): a run's start hashes its train split for the feature cache and again for the
  corpus identity, 281k files for LibriSpeech-960. Keep it around those back-to-back reads only:
  a listing is not refreshed while the context is open."""
  token = _listings.set({})
  try:
    yield
  finally:
    _listings.reset(token)


def _walk(split_dir: str) -> tuple[_Entry, ...]:
  """Each file of ``split_dir`` in sorted order (dot files and folders left out)."""
  entries = []
  for root, dirs, files in os.walk(split_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(files):
      if name.startswith("."):
        continue
      full = os.path.join(root, name)
      rel = os.path.relpath(full, split_dir).replace(os.sep, "/")
      st = os.stat(full)
      digest = None
      if name.endswith(".txt"):
        with open(full, "rb") as f:
          digest = hashlib.sha256(f.read()).digest()
      entries.append((rel, st.st_size, st.st_mtime_ns, digest))
  return tuple(entries)


def hash_split(h: "hashlib._Hash", split_dir: str, *, mtimes: bool) -> None:
  """Feeds ``h`` each file of ``split_dir`` in sorted order (dot files and folders left out):
  ``|relpath:size`` (``:mtime_ns`` with ``mtimes``), then a ``*.txt`` file's content sha256.

  Raises:
    CorpusError: if ``split_dir`` is not a directory.
  """
  if not os.path.isdir(split_dir):
    raise CorpusError(f"split directory {split_dir!r} does not exist")
  memo = _listings.get()
  key = os.path.abspath(split_dir)
  entries = memo.get(key) if memo is not None else None
  if entries is None:
    entries = _walk(split_dir)
    if memo is not None:
      memo[key] = entries
  for rel, size, mtime_ns, digest in entries:
    h.update(f"|{rel}:{size}".encode())
    if mtimes:
      h.update(f":{mtime_ns}".encode())
    if digest is not None:
      h.update(digest)


def identity(root: str, splits: Sequence[str]) -> str:
  """Hex sha256 of the corpus at ``root`` as its ``splits`` (in this order) and its speaker
  metadata make it: equal for a byte-identical copy made at another time, different when a
  split gains, loses or resizes a file or a transcript changes."""
  h = hashlib.sha256(b"corpus v1")
  speakers = os.path.join(root, SPEAKERS_FILE)
  if os.path.isfile(speakers):
    with open(speakers, "rb") as f:
      h.update(hashlib.sha256(f.read()).digest())
  for split in splits:
    h.update(f"#{split}".encode())
    hash_split(h, os.path.join(root, split), mtimes=False)
  return h.hexdigest()


def of_data_config(data: Mapping[str, Any]) -> str | None:
  """The identity of a run's corpus from its config's ``data`` section (``source``, ``root``,
  ``train_split`` ('+'-joined), ``dev_split``, ``test_split``); None for a TFDS source (its
  builder's version names its data)."""
  if data.get("source", "librispeech_dir") != "librispeech_dir":
    return None
  splits = [*data["train_split"].split("+"), data["dev_split"], data["test_split"]]
  return identity(data["root"], splits)
