"""fedprune_jax.federated: the federated engine.

Sampling (``sampling``), client data packing and stores (``client_data``,
``speakers``), the pure local training update (``client``), the algorithm seam
(``algorithm``: client programs, round plans), the generic aggregation (``aggregation``), cohort executors
(``executor``), server state and optimizers (``server``), device meshes and
multi-host feeding (``multihost``), the round driver (``rounds``), round
checkpoints (``checkpoints``), simulated client faults (``faults``), and fedjax interop (``fedjax_interop``; the only
importer of fedjax is ``fedjax_compat``). Algorithms live in
``fedprune_jax.algorithms``.
"""

from fedprune_jax.federated.client import ClientOutput, apply_mask, make_client_update
from fedprune_jax.federated.client_data import (
  Bucket,
  ClientStore,
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
from fedprune_jax.federated.algorithm import (
  ClientProgram,
  ExecutorCache,
  FederatedAlgorithm,
  RoundPlan,
  executor_factory,
)
from fedprune_jax.federated.rounds import run_rounds
from fedprune_jax.federated.sampling import CohortSampler, sample_cohort
from fedprune_jax.federated.server import (
  ServerState,
  make_server_optimizer,
  server_init,
  server_update,
)
from fedprune_jax.federated.speakers import SpeakerClientStore
