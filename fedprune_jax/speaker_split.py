"""The train split's speakers as the server's and the clients' (one client per speaker).

Speakers are split once, seeded by ``data.split_seed`` (default: the run's seed), into
``data.server_speakers`` server-side speakers (the warm start and the centralized baseline train
on them; drawn from ``data.server_accents`` when that is set) and the clients (the rest), whose
utterances a ``SpeakerClientStore`` packs into fixed-shape client batches.
"""

from __future__ import annotations

from typing import Collection, NamedTuple

import ml_collections
import numpy as np

from fedprune_jax.data import batching
from fedprune_jax.data import feature_sets
from fedprune_jax.errors import ConfigError
from fedprune_jax.federated.speakers import SpeakerClientStore


class SpeakerSplit(NamedTuple):
  """The train split's speakers: the server's (warm start, centralized baseline) and the
  clients' (one client each); both sorted."""

  server: list[str]
  clients: list[str]


def split_speakers(
  train_fs: feature_sets.FeatureSet,
  num_server: int,
  seed: int,
  eligible: Collection[str] | None = None,
) -> SpeakerSplit:
  """A seeded split of the train split's speakers into server-side and client speakers.

  Args:
    eligible: the speakers the server's speakers are drawn from (e.g. those of a few accents:
      ``data.server_accents``); None = all. The clients are every other speaker.
  """
  names = sorted(train_fs.speaker_indices())
  pool = names if eligible is None else [n for n in names if n in set(eligible)]
  if not 0 <= num_server < len(names) or num_server > len(pool):
    raise ConfigError(
      f"config field data.server_speakers={num_server} must be in [0, {len(names) - 1}] "
      f"(the train split has {len(names)} speakers"
      + (f", {len(pool)} of the server's accents)" if eligible is not None else ")")
    )
  order = np.random.default_rng([seed, 7]).permutation(len(pool))
  server = sorted(pool[i] for i in order[:num_server])
  return SpeakerSplit(server, [n for n in names if n not in set(server)])


def server_eligible(cfg: ml_collections.ConfigDict) -> list[str] | None:
  """The speakers of ``data.server_accents`` (None: the field is absent or empty)."""
  accents = cfg.data.get("server_accents")
  if not accents:
    return None
  from fedprune_jax.data import synth  # pylint: disable=g-import-not-at-top

  of = synth.speaker_accents(cfg.data.root)
  unknown = sorted(set(accents) - set(of.values()))
  if unknown:
    raise ConfigError(
      f"config field data.server_accents: {unknown[0]!r} is no accent of the corpus "
      f"({', '.join(sorted(set(of.values())))})"
    )
  return sorted(spk for spk, accent in of.items() if accent in set(accents))


def examples_of(fs: feature_sets.FeatureSet, speakers: list[str]) -> list[batching.Example]:
  index = fs.speaker_indices()
  return [fs.example(int(i)) for s in speakers for i in index[s]]


def make_store(cfg: ml_collections.ConfigDict, train_fs, speakers) -> SpeakerClientStore:
  """One client per speaker, packed to fixed [S, B, T, F] shape buckets."""
  return SpeakerClientStore(
    train_fs,
    batch_size=cfg.data.batch_size,
    num_buckets=cfg.data.num_buckets,
    max_steps=cfg.data.get("max_steps"),
    max_frames=cfg.data.get("max_frames"),
    speakers=speakers,
    packing=cfg.data.get("packing", "shape"),
    segments=cfg.data.get("segments", 1),
  )
