"""``fedprune bench fedround``: useful frames/s of a federated round vs a centralized step.

One run, on the same corpus features and the same model, interleaves:

(a) centralized training: the trainer's jitted step (``centralized.make_train_step``, SpecAugment
    on) over its length-bucketed batches of the whole training split;
(b) federated rounds: ``ChunkedExecutor`` over the real client update (Adam, SpecAugment,
    shuffled local steps) on ``SpeakerClientStore`` clients, once per packing setting
    (``old``: what ``fedprune federated`` did before issue 14; ``shape``: finer (S, T) buckets;
    ``segK``: length-sorted steps in K scan segments, see federated/speakers.py),

and prints *useful* frames/s (real, non-padding frames of real examples trained on per second)
for each, and the ratio federated / centralized. Every block is timed after compilation (each
shape is compiled in a warm-up pass); blocks of the sides alternate, so a load change on a
shared machine hits all of them alike. Centralized blocks are sized to about the frames of one
federated round.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import optax

from fedprune_jax import config as config_lib
from fedprune_jax import io_utils
from fedprune_jax import task
from fedprune_jax.data import batching
from fedprune_jax.federated import client, executor, sampling
from fedprune_jax.federated.speakers import SpeakerClientStore
from fedprune_jax.train import centralized

# SpeakerClientStore arguments of each packing setting; batch_size and max_steps come from the
# command line, like the job's data.batch_size / data.max_steps. Settings with segments > 1 run
# the segment-aware client update (client.make_client_update with a tuple of segments).
SETTINGS: dict[str, dict[str, Any]] = {
  "old": dict(num_buckets=4, packing="cost"),  # fedprune federated before issue 14
  "shape": dict(num_buckets=4, packing="shape"),
  "seg2": dict(num_buckets=4, segments=2),
  "seg3": dict(num_buckets=3, segments=3),
  "seg4": dict(num_buckets=3, segments=4),
}


def parse_setting(spec: str, default_chunk: int) -> tuple[str, int]:
  """``'seg3@1'`` -> ('seg3', 1): a packing setting and the executor's chunk size."""
  name, _, chunk = spec.partition("@")
  if name not in SETTINGS:
    raise ValueError(f"unknown setting {name!r}; known: {sorted(SETTINGS)}")
  return name, int(chunk) if chunk else default_chunk


def useful_frames(batch: dict[str, np.ndarray]) -> float:
  """Real frames of real examples in a ``[..., B, T]`` batch."""
  real = (1.0 - np.asarray(batch["feature_paddings"])) * (
    np.asarray(batch["weights"])[..., None] > 0
  )
  return float(real.sum())


def load_train_split(data: str | None, speakers: int, utterances: int) -> tuple[Any, str]:
  """The training split's FeatureSet; synthesizes a corpus into a cache dir without ``data``."""
  if data is None:
    from fedprune_jax.data import synth  # pylint: disable=g-import-not-at-top

    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", tempfile.gettempdir()))
    data = str(cache / f"fedprune_fedround_{speakers}x{utterances}")
    synth.synthesize_corpus(data, speakers=speakers, utterances=utterances, progress=False)
  cfg = config_lib.load_config("tiny_federated")
  cfg.data.root = data
  return task.load_split(cfg, cfg.data.train_split), data


class Centralized:
  """The centralized trainer's step over an endless stream of its bucketed batches."""

  def __init__(self, model, fs, batch_size: int, num_buckets: int, specaug: dict, seed: int = 0):
    optim = config_lib.load_config("tiny_centralized").optim
    self.optimizer = task.make_optimizer(optim, 10_000)
    self.step = centralized.make_train_step(model, self.optimizer, specaug)
    self.params = model.init(jax.random.key(seed))
    self.opt_state = self.optimizer.init(self.params)
    self.examples = fs.examples()
    self.boundaries = batching.bucket_boundaries(fs.num_frames, num_buckets)
    self.max_labels = batching.round_up(int(fs.num_labels.max()), 16)
    self.batch_size, self.seed = batch_size, seed
    self._epoch, self._n = 0, 0
    self._batches = self._epoch_batches()
    self.padding_fraction = batching.padding_fraction(self._epoch_batches())

  def _epoch_batches(self):
    return batching.bucketed_batches(
      self.examples,
      None,
      self.batch_size,
      self.boundaries,
      rng=np.random.default_rng([self.seed, self._epoch]),
      max_labels=self.max_labels,
    )

  def _next(self) -> dict[str, np.ndarray]:
    for _ in range(2):
      try:
        return next(self._batches)
      except StopIteration:
        self._epoch += 1
        self._batches = self._epoch_batches()
    raise RuntimeError("empty epoch")

  def warm_up(self) -> None:
    """Compiles every bucket's shape (one step each)."""
    seen = set()
    while len(seen) < len(self.boundaries):
      batch = self._next()
      seen.add(batch["features"].shape)
      self.run_batches([batch])

  def run_batches(self, batches: Sequence[dict]) -> None:
    m = None
    for batch in batches:
      self._n += 1
      key = jax.random.fold_in(jax.random.key(self.seed), self._n)
      self.params, self.opt_state, m = self.step(self.params, self.opt_state, batch, key)
    jax.block_until_ready(m)

  def block(self, min_frames: float) -> tuple[float, float]:
    """Runs steps until ``min_frames`` useful frames; returns (useful frames, seconds)."""
    batches, frames = [], 0.0
    while frames < min_frames:
      batches.append(self._next())
      frames += useful_frames(batches[-1])
    # batches are padded before the clock starts: the trainer pads the next batch on the host
    # while the device runs the current step
    t0 = time.perf_counter()
    self.run_batches(batches)
    return frames, time.perf_counter() - t0


class Federated:
  """Rounds of ``ChunkedExecutor`` over one ``SpeakerClientStore`` packing setting."""

  def __init__(
    self, model, fs, store_kwargs: dict, chunk: int, specaug: dict, a: argparse.Namespace
  ):
    self.store = SpeakerClientStore(fs, **store_kwargs)
    loss_fn = task.make_training_loss(model, specaug)
    update = client.make_client_update(loss_fn, optax.adam(a.client_lr), 1, shuffle=True)
    vmap_size = None if a.vmap_size is None else min(a.vmap_size, chunk)
    self.executor = executor.ChunkedExecutor(update, chunk, vmap_size=vmap_size)
    self.params = model.init(jax.random.key(a.seed))
    self.cohort_size = min(a.cohort, self.store.num_clients)
    self.seed = a.seed
    self._frames = self.store.useful_frames()

  def warm_up(self) -> None:
    """Compiles every bucket (a round of one client per bucket)."""
    all_ids = np.arange(self.store.num_clients)
    b = self.store.bucket_of(all_ids)
    ids = np.array([all_ids[b == k][0] for k in np.unique(b)])
    self.executor(self.params, self.store, ids, jax.random.key(0))

  def round(self, r: int) -> tuple[float, float]:
    """One round of a sampled cohort; returns (useful frames, seconds)."""
    cohort = sampling.sample_cohort(self.store.num_clients, self.cohort_size, self.seed, r)
    _, metrics = executor.timed(
      self.executor, self.params, self.store, cohort, jax.random.fold_in(jax.random.key(1), r)
    )
    return float(self._frames[cohort].sum()), metrics["seconds"]


def run(a: argparse.Namespace) -> dict[str, Any]:
  if a.compile_cache:
    jax.config.update("jax_compilation_cache_dir", a.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  fs, data = load_train_split(a.data, a.speakers, a.utterances)
  base = config_lib.load_config("tiny_centralized")
  model = task.make_model(
    ml_collections.ConfigDict(dict(model=dict(preset=a.preset, head="ctc", overrides={})))
  )
  specaug = dict(base.specaug)
  cent = Centralized(model, fs, a.central_batch_size, a.num_buckets, specaug, a.seed)
  feds = {}
  for spec in [s for s in a.settings.split(",") if s]:
    name, chunk = parse_setting(spec, a.chunk)
    kwargs = dict(SETTINGS[name], batch_size=a.batch_size, max_steps=a.max_steps)
    feds[f"{name}@{chunk}"] = Federated(model, fs, kwargs, chunk, specaug, a)
  report: dict[str, Any] = {
    "data": data,
    "preset": a.preset,
    "utterances": len(fs),
    "load_avg_before": os.getloadavg(),
    "centralized": {"batch_size": a.central_batch_size, "padding_fraction": cent.padding_fraction},
  }
  for name, f in feds.items():
    report[name] = {
      "store": dict(SETTINGS[name.split("@")[0]]),
      "chunk_size": f.executor.chunk_size,
      "num_buckets": len(f.store.buckets),
      "padding_fraction": f.store.padding_fraction(),
    }
  for name, f in [("centralized", cent), *feds.items()]:
    t0 = time.perf_counter()
    f.warm_up()
    report.setdefault("warm_up_s", {})[name] = time.perf_counter() - t0
    print(f"compiled {name} in {time.perf_counter() - t0:.0f} s", flush=True)
  sums = {k: [0.0, 0.0] for k in ["centralized", *feds]}
  for r in range(a.rounds):
    round_frames = []
    for name, f in feds.items():
      frames, secs = f.round(r)
      sums[name][0] += frames
      sums[name][1] += secs
      round_frames.append(frames)
      print(f"round {r} {name}: {frames / secs:9.0f} useful frames/s ({secs:.1f} s)", flush=True)
    frames, secs = cent.block(float(np.mean(round_frames)))
    sums["centralized"][0] += frames
    sums["centralized"][1] += secs
    print(f"round {r} centralized: {frames / secs:9.0f} useful frames/s ({secs:.1f} s)", flush=True)
  cent_rate = sums["centralized"][0] / sums["centralized"][1]
  report["centralized"]["useful_frames_per_s"] = cent_rate
  report["load_avg_after"] = os.getloadavg()
  print(
    f"\n== {a.preset}, {len(fs)} utterances, cohort {a.cohort}, "
    f"vmap_size {a.vmap_size}, {a.rounds} interleaved rounds"
  )
  print(f"{'side':<20}{'padding':>9}{'useful frames/s':>17}{'vs centralized':>16}")
  print(f"{'centralized':<20}{cent.padding_fraction:>9.3f}{cent_rate:>17.0f}{1.0:>16.2f}")
  for name in feds:
    rate = sums[name][0] / sums[name][1]
    report[name]["useful_frames_per_s"] = rate
    report[name]["ratio_to_centralized"] = rate / cent_rate
    pad = report[name]["padding_fraction"]
    print(f"{'federated ' + name:<20}{pad:>9.3f}{rate:>17.0f}{rate / cent_rate:>16.2f}")
  return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog="fedprune bench fedround", description=__doc__.split("\n")[0])
  p.add_argument("--data", default=None, help="corpus root (default: synthesize a small one)")
  p.add_argument("--speakers", type=int, default=24, help="speakers of the synthesized corpus")
  p.add_argument("--utterances", type=int, default=20, help="utterances per synthesized speaker")
  p.add_argument("--preset", default="tiny")
  p.add_argument(
    "--settings",
    default="old@8,seg4@1",
    help=f"comma list of SETTING[@CHUNK]; settings: {sorted(SETTINGS)}; CHUNK default --chunk",
  )
  p.add_argument("--batch-size", type=int, default=8, help="client batch B (data.batch_size)")
  p.add_argument("--max-steps", type=int, default=8, help="local steps cap S (data.max_steps)")
  p.add_argument("--central-batch-size", type=int, default=32)
  p.add_argument("--num-buckets", type=int, default=4, help="centralized length buckets")
  p.add_argument("--cohort", type=int, default=16)
  p.add_argument("--chunk", type=int, default=8, help="engine.chunk_size (default of settings)")
  p.add_argument("--vmap-size", type=int, default=None)
  p.add_argument("--client-lr", type=float, default=1e-3)
  p.add_argument("--rounds", type=int, default=3, help="timed rounds per setting")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the report here")
  p.add_argument(
    "--compile-cache",
    default=os.path.join(tempfile.gettempdir(), "fedprune_jax_compile_cache"),
    help="persistent XLA compilation cache ('' = off): reruns skip most compilation",
  )
  a = p.parse_args(argv)
  report = run(a)
  if a.json:
    io_utils.write_json_atomic(a.json, report)
  return report


if __name__ == "__main__":
  main()
