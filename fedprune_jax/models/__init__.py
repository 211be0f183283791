"""fedprune_jax.models: Conformer encoder, CTC and RNN-T heads, head-agnostic AsrModel."""

from fedprune_jax.models.asr import AsrModel, CtcHead, Head, make_asr_model
from fedprune_jax.models.conformer import (
  PRESETS,
  ConformerConfig,
  ConformerEncoder,
  count_params,
  get_config,
)
from fedprune_jax.models.ctc import ctc_loss, greedy_decode, ids_to_strings
from fedprune_jax.models.rnnt import rnnt_loss, rnnt_loss_from_logits
from fedprune_jax.models.transducer import RnntHead
