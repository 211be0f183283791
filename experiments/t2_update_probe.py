"""Why T2's `update` score prunes like `random`: what a client's |delta w| measures under Adam.

Two measurements, printed:

1. Mask overlap: for each replicate (seed, split) of T2, the fraction of magnitude's kept entries
   that each other arm keeps too (chance = the kept fraction, 0.30 at 70 % sparsity).
2. The score itself: from a run's warm start, ``--clients`` clients (the first train speakers with
   a full epoch) each take the run's local steps with a fresh Adam at the run's client learning
   rate, as the federated clients do (but on the speaker's first utterances in order, padded to
   its longest, not the engine's shuffled, bucketed batches); printed: the quantiles of |delta w| / (steps * lr) and the
   Spearman correlations of the cohort's mean |delta w| with |w| and with the mean |g|, and the
   overlap of its top (1 - sparsity) with magnitude's.

Run (after `fedprune experiment t2_score ...`):
  python experiments/t2_update_probe.py RUNS [--clients 4]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.stats

from fedprune_jax import task
from fedprune_jax import warm_start
from fedprune_jax.data import batching


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _kept(mask_path: pathlib.Path) -> np.ndarray:
  """A run's final mask, flattened in key order: bool [n]."""
  with np.load(mask_path) as m:
    return np.concatenate([m[k].ravel() for k in sorted(m.keys())]).astype(bool)


def mask_overlaps(runs: pathlib.Path, table: dict) -> None:
  """Prints, per replicate, the share of magnitude's kept entries each other arm keeps."""
  by_replicate: dict[tuple, dict[str, pathlib.Path]] = collections.defaultdict(dict)
  for r in table["runs"]:
    path = runs / r["dir"] / "mask.npz"
    if r["state"] == "done" and path.exists():
      by_replicate[(r["seed"], r["split"])][r["arm"]] = path
  for (seed, split), arms in sorted(by_replicate.items()):
    if "magnitude" not in arms or len(arms) < 2:
      continue
    magnitude = _kept(arms["magnitude"])
    cells = [
      f"{arm} {(_kept(p) & magnitude).sum() / magnitude.sum():.3f}"
      for arm, p in sorted(arms.items())
      if arm != "magnitude"
    ]
    print(f"seed {seed} split {split} (magnitude keeps {magnitude.mean():.2f}):", ", ".join(cells))


def adam_update_scores(run: pathlib.Path, clients: int) -> None:
  """Prints what the ``update`` score of ``clients`` fresh-Adam clients carries (see above)."""
  cfg = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
  model = task.make_model(cfg)
  params = task.restore_params(
    warm_start.path_of(cfg, run.parent.parent), model.init(jax.random.PRNGKey(0))
  )
  loss_fn = task.make_training_loss(model, dict(cfg.specaug) if cfg.specaug else None)
  grad_fn = jax.jit(jax.grad(lambda p, b, k: loss_fn(p, b, k)[0]))
  train = task.load_split(cfg, cfg.data.train_split)
  steps, batch_size, lr = cfg.data.max_steps, cfg.data.batch_size, cfg.client.learning_rate
  by_speaker: dict[str, list[int]] = collections.defaultdict(list)
  for i, s in enumerate(train.speaker_ids):
    by_speaker[str(s)].append(i)
  speakers = [s for s in sorted(by_speaker) if len(by_speaker[s]) >= steps * batch_size][:clients]
  w0 = _flat(params)
  deltas, grads = [], []
  for speaker in speakers:
    examples = [train.example(i) for i in by_speaker[speaker][: steps * batch_size]]
    frames = max(e[0].shape[0] for e in examples)
    labels = max(len(e[1]) for e in examples)
    opt = optax.adam(lr)
    state, p, grad_sum = opt.init(params), params, 0.0
    for t in range(steps):
      padded = batching.pad_batch(
        examples[t * batch_size : (t + 1) * batch_size],
        batch_size=batch_size,
        max_frames=frames,
        max_labels=labels,
      )
      batch = {k: jnp.asarray(v) for k, v in padded.items() if np.asarray(v).dtype.kind != "U"}
      g = grad_fn(p, batch, jax.random.PRNGKey(t))
      grad_sum = grad_sum + np.abs(_flat(g))
      updates, state = opt.update(g, state, p)
      p = optax.apply_updates(p, updates)
    deltas.append(np.abs(_flat(p) - w0))
    grads.append(grad_sum / steps)
  update, mean_grad, magnitude = np.mean(deltas, 0), np.mean(grads, 0), np.abs(w0)
  q = [0.05, 0.25, 0.5, 0.75, 0.95]
  print(f"{len(speakers)} clients x {steps} Adam steps (lr {lr}), {update.size} entries")
  print(
    "one client's |dw| / (steps lr), quantiles 5-95 %:",
    np.round(np.quantile(deltas[0] / (steps * lr), q), 3),
  )
  print(
    "cohort mean |dw| / (steps lr), quantiles 5-95 %:",
    np.round(np.quantile(update / (steps * lr), q), 3),
  )
  rho = lambda a, b: scipy.stats.spearmanr(a, b).statistic  # noqa: E731
  print(
    f"Spearman: update-|w| {rho(update, magnitude):.3f},"
    f" update-mean|g| {rho(update, mean_grad):.3f},"
    f" saliency(|w| mean|g|)-|w| {rho(magnitude * mean_grad, magnitude):.3f}"
  )
  k = int(round((1 - cfg.pruning.target_sparsity) * update.size))
  top = lambda a: set(np.argpartition(-a, k)[:k].tolist())  # noqa: E731
  kept = top(magnitude)
  print(
    f"top {k} overlap with magnitude's: update {len(top(update) & kept) / k:.3f},"
    f" saliency {len(top(magnitude * mean_grad) & kept) / k:.3f}"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", type=pathlib.Path, help="the suite's --runs directory")
  parser.add_argument("--clients", type=int, default=4)
  args = parser.parse_args()
  table = json.loads((args.runs / "t2_score.json").read_text())
  mask_overlaps(args.runs, table)
  first = next(r for r in table["runs"] if r["arm"] == "update" and r["state"] == "done")
  adam_update_scores(args.runs / first["dir"], args.clients)


if __name__ == "__main__":
  main()
