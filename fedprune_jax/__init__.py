"""fedprune_jax: federated pruning of Conformer speech recognizers in JAX/Flax.

Implements "Federated Pruning: Improving Neural Network Efficiency with
Federated Learning" (Lin et al., Interspeech 2022).  Sub-packages:

- ``fedprune_jax.data``: corpora (synthetic espeak speakers, LibriSpeech,
  TFDS), features, tokenizer, batching.
- ``fedprune_jax.models``: Conformer encoder, CTC and RNN-T heads, the head-agnostic
  ``AsrModel`` interface.
- ``fedprune_jax.pruning``: masks, scores, patterns, allocation, schedules.
- ``fedprune_jax.federated``: the engine: client sampling, client update, the
  ``FederatedAlgorithm`` seam, aggregation, executors, round driver, checkpoints.
- ``fedprune_jax.algorithms``: FedAvg/FedAdam/FedYogi, federated pruning, the
  mask policy, the centralized pruning baseline, cost accounting.
- ``fedprune_jax.task`` / ``evaluation``: data, model, loss and evaluation
  shared by every trainer; ``fedprune_jax.job``: the federated pruning job.
- ``fedprune_jax.train``: centralized training.
"""

__version__ = "0.1.0"
