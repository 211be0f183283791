"""Programs shared by the runs of one process.

``jax.jit`` traces, lowers and compiles a function once per function *object* (and input shapes).
A run builds its training loss, client update and server update as closures over its config, so
a second run with an equal config in the same process (the next arm or seed of a
``fedprune experiment`` suite) would trace and lower them again: tens of seconds per run on a CPU,
of which XLA's persistent compilation cache saves only the compile. ``shared(key, build)`` returns
the object that ``build()`` made for an equal ``key`` earlier in this process, so equal programs
are traced and compiled once. ``enable_compilation_cache`` keeps the compiled executables across
processes too (XLA's persistent cache).

A key must name every value the built object depends on (``config_key`` turns config sections
into a hashable canonical string). ``tests/test_programs.py`` checks that runs give bit-identical
results with and without sharing.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import threading
from typing import Any, Callable, Hashable, TypeVar

from fedprune_jax.errors import ConfigError

T = TypeVar("T")

# Entries hold traced and compiled programs; a suite cycles through a few dozen (one per arm's
# server update and per client-side configuration). They are large: the 9 entries of a quick T6
# table on the 30-word corpus held 1.4 GB (measured: 2.2 GB resident after its 5 runs, 0.47 GB
# after ``release``), so a suite worker also bounds them by memory (``workers.timed_run``).
MAX_ENTRIES = 64

_cache: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}


def config_key(*sections: Any) -> str:
  """A canonical string of JSON-able config values (dict order does not matter)."""
  return json.dumps(sections, sort_keys=True, default=repr)


def shared(key: Hashable | None, build: Callable[[], T]) -> T:
  """The object ``build()`` made for an equal ``key`` in this process (least recently used first
  out beyond ``MAX_ENTRIES``); builds and remembers it on first use. ``key=None``: the object may
  not be shared, so it is built and not remembered."""
  if key is None:
    return build()
  with _lock:
    if key in _cache:
      _cache.move_to_end(key)
      _stats["hits"] += 1
      return _cache[key]
  value = build()
  with _lock:
    _stats["misses"] += 1
    _cache[key] = value
    while len(_cache) > MAX_ENTRIES:
      _cache.popitem(last=False)
  return value


def clear() -> None:
  """Forgets every shared program (the next run traces and compiles anew)."""
  with _lock:
    _cache.clear()


def release() -> None:
  """Forgets every shared program and JAX's own caches of traced and compiled functions, and
  hands the freed memory back to the operating system."""
  import jax  # pylint: disable=g-import-not-at-top

  clear()
  jax.clear_caches()
  return_free_memory()


def return_free_memory() -> None:
  """Collects garbage and hands the heap's free memory back to the operating system (glibc's
  ``malloc_trim``: without it the process keeps most of what a finished run freed)."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc (macOS, musl): the memory is reused, not returned
    pass


def resident_bytes() -> int | None:
  """This process's resident memory in bytes (Linux ``/proc``; None elsewhere)."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def stats() -> dict[str, int]:
  """{'hits', 'misses', 'entries'} since the process started."""
  with _lock:
    return {**_stats, "entries": len(_cache)}


def enable_compilation_cache() -> None:
  """Persists XLA executables across processes (demo after test, repeated configs, the suite's
  workers) unless disabled.

  Set FEDPRUNE_JAX_CACHE to a directory to move it, or to an empty string to turn it off.
  Programs that compiled faster than FEDPRUNE_JAX_CACHE_MIN_SECONDS (default 2) are not kept;
  the test suite sets it to 0 (its micro models compile in well under a second, many times over).
  """
  cache_dir = os.environ.get("FEDPRUNE_JAX_CACHE", os.path.expanduser("~/.cache/fedprune_jax/xla"))
  if not cache_dir:
    return
  import jax  # pylint: disable=g-import-not-at-top

  raw = os.environ.get("FEDPRUNE_JAX_CACHE_MIN_SECONDS", "2")
  try:
    min_seconds = float(raw)
  except ValueError:
    msg = f"FEDPRUNE_JAX_CACHE_MIN_SECONDS={raw!r} is not a number of seconds"
    raise ConfigError(msg) from None
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
