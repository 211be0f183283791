"""Where the suite's runs execute: in this process, or in worker processes each pinned to its
own CPU cores (``fedprune experiment --workers N``).

On a CPU, XLA spreads one run over every core, but the tiny models of the small setting keep two
cores busy only part of the time: two single-core runs side by side finish more runs per hour
than one two-core run after the other (README, "Paper experiments"). A worker is a process that
lives as long as the pool, so the runs it executes share their traced programs
(``fedprune_jax.programs``) as they do in one process.

XLA's CPU kernels split their work by the number of threads, so a run on one core and the same
run on two may differ in the last bits of their floats (the same config and seed, on the same
machine and worker count, give the same bits). A run's cache key does not hold the worker count.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import multiprocessing
import os
import time
from typing import Any, Callable

import ml_collections

from fedprune_jax import programs
from fedprune_jax.data import workers as process_hygiene
from fedprune_jax.errors import InputError

Runner = Callable[[str, ml_collections.ConfigDict], Any]

# Linux pins each worker to its cores; elsewhere (macOS) workers run unpinned
PINNING = hasattr(os, "sched_setaffinity")


def core_groups(workers: int, cores: list[int] | None = None) -> list[list[int]]:
  """The CPU cores of each worker: the available ones dealt out round-robin.

  Raises:
    InputError: fewer cores than workers, or ``workers < 1``.
  """
  if cores is None:
    cores = sorted(os.sched_getaffinity(0)) if PINNING else list(range(os.cpu_count() or 1))
  if workers < 1:
    raise InputError(f"--workers must be >= 1, got {workers}")
  if workers > len(cores):
    raise InputError(
      f"--workers {workers}: each worker needs a CPU core of its own; this process may use "
      f"{len(cores)}"
    )
  return [cores[i::workers] for i in range(workers)]


def memory_budget(workers: int) -> int | None:
  """Resident bytes a worker may keep between runs: ``1 / (3 * workers)`` of the machine's memory.
  A run of the 30-word setting adds 4-6 GB to what its worker kept (measured every minute on
  2026-12-05: with a quarter of 24 GB kept, a worker peaked at 9.9 GB), so on 24 GB two workers
  keep 4 GB each, peak near 10 GB, and leave about 4 GB for everything else. None where the
  memory is not known."""
  try:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None
  return total // (3 * workers)


def timed_run(runner: Runner, kind: str, config: dict, budget: int | None = None) -> float:
  """Runs ``runner(kind, ConfigDict(config))``; returns its wall seconds. If this process then
  holds more than ``budget`` bytes, it returns the memory the run freed to the system, and if it
  still holds more, it releases its shared programs (``programs.release``): the next runs trace
  theirs again and find the compiled code in XLA's persistent cache. Kept, they grew a suite
  worker to 11.8 GB, and the kernel killed it."""
  start = time.monotonic()
  runner(kind, ml_collections.ConfigDict(config))
  seconds = time.monotonic() - start
  if budget is not None and (programs.resident_bytes() or 0) > budget:
    programs.return_free_memory()  # what the finished run freed first: the programs may fit
    if (programs.resident_bytes() or 0) > budget:
      programs.release()
  return seconds


def _init_worker(cores: "multiprocessing.Queue", compilation_cache: bool, parent: int) -> None:
  # a killed suite leaves no worker writing into the run it had
  process_hygiene.exit_with_parent(parent)
  # before JAX creates its CPU client, which sizes its thread pool by the cores it may use
  group = cores.get()
  if PINNING:
    os.sched_setaffinity(0, group)
  if compilation_cache:
    programs.enable_compilation_cache()


def worker_died(error: BaseException) -> bool:
  """Whether a run's error is its worker process ending under it (killed by the OS, e.g. out of
  memory, or by a signal), not an error of the run: every run of that pool ends so."""
  return isinstance(error, concurrent.futures.process.BrokenProcessPool)


class RunPool:
  """Executes runs: ``submit(kind, config) -> Future`` of the run's wall seconds.

  ``workers=1`` runs each run in this process when it is submitted (its future is done on
  return); ``workers > 1`` starts that many processes (spawned, so no JAX state is forked), each
  pinned to ``core_groups(workers)[i]``. ``runner`` must then be picklable (a module-level
  function or a ``functools.partial`` of one).
  """

  def __init__(self, runner: Runner, workers: int = 1):
    self._groups = core_groups(workers)
    self.runner = runner
    self.workers = workers
    self.restarts = 0  # pools started anew after a worker died
    self.budget = memory_budget(workers)  # a worker's resident bytes between runs
    self._pool = self._start() if workers > 1 else None

  def _start(self) -> concurrent.futures.ProcessPoolExecutor:
    import jax  # pylint: disable=g-import-not-at-top

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    for group in self._groups:
      queue.put(group)
    return concurrent.futures.ProcessPoolExecutor(
      self.workers,
      mp_context=context,
      initializer=_init_worker,
      initargs=(queue, bool(jax.config.jax_compilation_cache_dir), os.getpid()),
    )

  def submit(self, kind: str, config: ml_collections.ConfigDict) -> concurrent.futures.Future:
    """Starts a run; a pool whose worker died (its runs end with ``worker_died`` errors) is
    replaced by a new one first."""
    plain = config.to_dict()
    if self._pool is not None:
      try:
        return self._pool.submit(timed_run, self.runner, kind, plain, self.budget)
      except concurrent.futures.process.BrokenProcessPool:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._start()
        self.restarts += 1
        return self._pool.submit(timed_run, self.runner, kind, plain, self.budget)
    future = concurrent.futures.Future()
    try:
      future.set_result(timed_run(self.runner, kind, plain, self.budget))
    except Exception as e:  # pylint: disable=broad-except  (reported by the caller)
      future.set_exception(e)
    return future

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> "RunPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
