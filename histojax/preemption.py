"""Preemption: on SIGTERM, finish the step, save a checkpoint, exit cleanly.

Cloud TPU maintenance, spot/preemptible reclaims, SLURM's `--signal` and
`docker stop` all announce the end with SIGTERM and kill a little later. The
training loop asks `Watcher.reached(step)` after every step:

- single process: a SIGTERM handler sets a flag; the loop sees it after the
  step in flight and saves.
- multi-process (after `jax.distributed.initialize`): JAX's own preemption
  service listens for SIGTERM on every process and agrees, over the
  coordination service, on one step at which all processes save together (a
  process that saved alone would leave the others hanging in a collective).
  Installing a Python handler there would displace JAX's, so none is.

Grain's worker processes ignore SIGTERM (`shield_worker`): a signal sent to
the whole process group must not kill the input pipeline before the main
process has taken its last batches and saved. Workers still exit when the
main process is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils


def _multi_controller() -> bool:
  return jax.distributed.is_initialized()


class Watcher:
  """Context manager around the training loop; see the module docstring."""

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    self._use_jax = False

  def __enter__(self) -> "Watcher":
    self._use_jax = _multi_controller()
    if not self._use_jax and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    # After the loop SIGTERM kills as usual: the final checkpoint is written, and
    # evaluation can be rerun from it.
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._requested.set()

  def reached(self, step: int) -> bool:
    """True at the step where this run must save and stop (the same on every process)."""
    if self._use_jax:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()


def shield_worker(worker_index: int, worker_count: int) -> None:
  """Grain `worker_init_fn`: ignore SIGTERM, and exit once the parent is gone."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent = os.getppid()

  def exit_when_orphaned():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=exit_when_orphaned, daemon=True, name="histojax-orphan-watch").start()
