"""One round on 4 forced host devices and on 2 processes (gloo) equals the
single-device sequential reference (FedAvg, and federated pruning's trimmed-mean client scores)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fedprune_jax.federated import executor

WORKER = textwrap.dedent("""
    import os, sys
    mode, out = sys.argv[1], sys.argv[2]
    import jax
    if mode == 'multiprocess':
      from fedprune_jax.federated import multihost
      multihost.initialize(f'localhost:{sys.argv[3]}', 2, int(sys.argv[4]))
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fedprune_jax.federated import executor, multihost
    import case
    store, cu, params, ids, key, opt = case.build()
    mesh = multihost.client_mesh()
    results = {}
    for chunk in ((8,) if mode == 'devices' else (4,)):
      ex = executor.ChunkedExecutor(cu, chunk, mesh=mesh)
      delta, m = ex(params, store, ids, key)
      state = case.server_round(params, delta.update['delta'], opt)
      results[f'c{chunk}'] = np.concatenate(
          [np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])
      results[f'n{chunk}'] = np.array([m['num_clients'], m['num_examples']])
      alg, msg = case.build_fedprune()
      ex = executor.ChunkedExecutor(
          alg.client_update, chunk, mesh=mesh, reducers=alg.reducers)
      agg, _ = ex(msg, store, ids, key)
      results[f's{chunk}'] = np.concatenate(
          [np.ravel(x) for x in jax.tree_util.tree_leaves(agg.update)])
    results['devices'] = np.array([jax.device_count(), jax.process_count()])
    if jax.process_index() == 0:
      np.savez(out, **results)
""")

CASE = textwrap.dedent("""
    import jax, numpy as np, optax
    from fedprune_jax.federated import client, client_data, server, toy

    def build():
      store = client_data.SyntheticClientStore(
          11, batch_size=3, max_examples=7, num_frames=5, feature_dim=4,
          label_len=2, num_classes=3, seed=5, num_buckets=1)
      cu = client.make_client_update(toy.make_loss_fn(),
                                     optax.sgd(0.3), num_epochs=2,
                                     shuffle=True)
      params = toy.init_params(jax.random.key(0), 4, 3, hidden=5)
      ids = np.array([10, 2, 6, 0, 8, 4, 1, 9, 3])
      key = jax.random.fold_in(jax.random.key(1), 0)
      return store, cu, params, ids, key, server.make_server_optimizer(
          'fedadam', 0.05)

    def server_round(params, delta, opt):
      return server.server_update(server.server_init(params, opt), delta, opt)

    def build_fedprune():
      # client-data scores with a trimmed mean: a reducer whose state is not a plain sum
      from fedprune_jax.algorithms import build as build_lib
      cfg = build_lib.rounds.resolve_config({'cohort_size': 9, 'client': {'learning_rate': 0.3}})
      pcfg = build_lib.resolve_pruning({'score': 'saliency', 'client_aggregation': 'trimmed_mean',
                                        'trim_fraction': 0.2, 'pruning_rounds': 4})
      alg = build_lib.build_algorithm(cfg, toy.make_loss_fn(), build_lib.policy_from_config(pcfg))
      state = alg.init(toy.init_params(jax.random.key(0), 4, 3, hidden=5), 0)
      plan = alg.plan_round(state)  # the client program and its input
      return plan.program, plan.client_input
""")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("fed_dist")
  (d / "worker.py").write_text(WORKER)
  (d / "case.py").write_text(CASE)
  return d


@pytest.fixture(scope="module")
def reference(workdir):
  sys.path.insert(0, str(workdir))
  try:
    import case  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  store, cu, params, ids, key, opt = case.build()
  delta, m = executor.SequentialExecutor(cu)(params, store, ids, key)
  state = case.server_round(params, delta.update["delta"], opt)
  flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])
  moved = np.abs(
    flat - np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)])
  ).max()
  assert moved > 1e-3
  alg, msg = case.build_fedprune()
  agg, _ = executor.SequentialExecutor(alg.client_update, reducers=alg.reducers)(
    msg, store, ids, key
  )
  scores = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(agg.update)])
  return flat, np.array([m["num_clients"], m["num_examples"]]), scores


def _env(devices):
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  env["PYTHONPATH"] = os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    + env.get("PYTHONPATH", "").split(os.pathsep)
  )
  return env


def _check(out_file, reference, devices, processes, chunks):
  res = np.load(out_file)
  ref, counts, scores = reference
  assert res["devices"].tolist() == [devices, processes]
  for chunk in chunks:
    np.testing.assert_allclose(res[f"c{chunk}"], ref, atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(res[f"n{chunk}"], counts)
    np.testing.assert_allclose(res[f"s{chunk}"], scores, atol=2e-6, rtol=1e-5)


def test_four_devices(workdir, reference):
  out = workdir / "dev4.npz"
  subprocess.run(
    [sys.executable, str(workdir / "worker.py"), "devices", str(out)],
    env=_env(4),
    check=True,
    timeout=300,
    cwd=workdir,
  )
  _check(out, reference, 4, 1, (8,))


def test_two_processes(workdir, reference):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = workdir / "proc2.npz"
  procs = [
    subprocess.Popen(
      [sys.executable, str(workdir / "worker.py"), "multiprocess", str(out), str(port), str(i)],
      env=_env(2),
      cwd=workdir,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
  _check(out, reference, 4, 2, (4,))
