"""Counting XLA compilations: how many backend compiles ran, and their seconds.

``CompileCounter`` listens to JAX's ``/jax/core/compile/backend_compile_duration`` event (one per
program XLA compiles; a persistent-cache hit is not a compile) while it is active.
"""

from __future__ import annotations

import threading

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """``with CompileCounter() as c: ...`` -> ``c.count`` compiles, ``c.seconds`` spent in them."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self._lock = threading.Lock()

  def _listen(self, event: str, duration: float, **_) -> None:
    if event == BACKEND_COMPILE_EVENT:
      with self._lock:
        self.count += 1
        self.seconds += float(duration)

  def __enter__(self) -> CompileCounter:
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)
