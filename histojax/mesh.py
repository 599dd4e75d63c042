"""The device mesh and how arrays are laid out on it.

Training is jit over a named mesh (not pmap): the batch is split along every
mesh axis, the state is replicated, and XLA inserts the collectives that
global-batch losses and batch norm need.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with one `data` axis over `devices` (default: all).

  Built with Auto axis types: `jax.make_mesh` defaults to Explicit axes in
  this JAX, under which convolutions fail to propagate shardings.
  """
  devices = list(jax.devices() if devices is None else devices)
  size = len(devices) if mesh_config.data == -1 else mesh_config.data
  if size != len(devices):
    raise ValueError(f"mesh.data={mesh_config.data} but {len(devices)} devices are available")
  return Mesh(np.asarray(devices).reshape(size), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all mesh axes."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch: int, mesh: Mesh, field: str = "input.batch_size") -> int:
  """This process's share of a global batch; fails early if it does not divide."""
  n_dev = mesh.size
  if global_batch % n_dev:
    raise ValueError(f"{field}={global_batch} does not divide over {n_dev} devices")
  return global_batch // jax.process_count()


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local rows into one global array per field."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Fetches (possibly multi-process) global arrays as full numpy arrays."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)
