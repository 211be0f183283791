"""fedprune_jax.federated: the federated engine.

Sampling (``sampling``), client data packing and stores (``client_data``,
``speakers``), the pure client update (``client``), cohort executors
(``executor``), server optimizers (``server``), device meshes and multi-host
feeding (``multihost``), the round driver (``rounds``), and fedjax interop
(``fedjax_interop``; the only importer of fedjax is ``fedjax_compat``).
"""

from fedprune_jax.federated.client import ClientOutput, apply_mask, client_rng, make_client_update
from fedprune_jax.federated.client_data import (
  Bucket,
  ClientStore,
  FunctionClientStore,
  InMemoryClientStore,
  SyntheticClientStore,
  make_buckets,
  pack_client,
)
from fedprune_jax.federated.executor import (
  ChunkedExecutor,
  DrjaxExecutor,
  SequentialExecutor,
  plan_chunks,
)
from fedprune_jax.federated.rounds import run_federated, run_rounds
from fedprune_jax.federated.sampling import CohortSampler, sample_cohort
from fedprune_jax.federated.server import (
  ServerState,
  make_server_optimizer,
  server_init,
  server_update,
)
from fedprune_jax.federated.speakers import SpeakerClientStore
