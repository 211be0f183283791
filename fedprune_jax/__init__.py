"""fedprune_jax: federated pruning of Conformer speech recognizers in JAX/Flax.

Implements "Federated Pruning: Improving Neural Network Efficiency with
Federated Learning" (Lin et al., Interspeech 2022).  Sub-packages:

- ``fedprune_jax.data``: corpora (synthetic espeak speakers, LibriSpeech,
  TFDS), features, tokenizer, batching.
- ``fedprune_jax.models``: Conformer encoder, CTC and RNN-T heads, the head-agnostic
  ``AsrModel`` interface.
- ``fedprune_jax.pruning``: masks, scores, patterns, allocation, schedules.
- ``fedprune_jax.federated``: client sampling, client update, cohort
  executor, server optimizers, fedjax interop.
- ``fedprune_jax.train``: centralized training and evaluation.
"""

__version__ = "0.1.0"
