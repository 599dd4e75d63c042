"""The device mesh and how arrays are laid out on it.

Training is jit over a named mesh (not pmap) with two axes, `data` and
`fsdp`: the batch is split along both, the state is replicated or split over
`fsdp` by path rules (sharding.py), and XLA inserts the collectives that
global-batch losses, batch norm and FSDP need. The mesh spans every device of
every process, so the same config runs on 1 device and on a 256-chip pod.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


AXES = ("data", "fsdp")


def axis_sizes(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes; one of them may be -1, meaning "the remaining devices"."""
  data, fsdp = mesh_config.data, mesh_config.fsdp
  for name, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if value == 0 or value < -1:
      raise ValueError(f"{name} must be a positive device count or -1 (the rest), got {value}")
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp are both -1; at most one axis can take the remaining devices")
  if data == -1 or fsdp == -1:
    fixed_name, fixed = ("mesh.fsdp", fsdp) if data == -1 else ("mesh.data", data)
    if num_devices % fixed:
      raise ValueError(f"{fixed_name}={fixed} does not divide the {num_devices} available devices")
    rest = num_devices // fixed
    return (rest, fsdp) if data == -1 else (data, rest)
  if data * fsdp != num_devices:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, "
                     f"but {num_devices} devices are available")
  return data, fsdp


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh with axes (`data`, `fsdp`) over `devices` (default: all, of all processes).

  Built with Auto axis types: `jax.make_mesh` defaults to Explicit axes in
  this JAX, under which convolutions fail to propagate shardings. The device
  grid comes from `create_device_mesh`, which on TPU follows the physical
  torus so that `fsdp` (the chattier axis, last) maps to nearby chips.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = axis_sizes(mesh_config, len(devices))
  grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all mesh axes."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch: int, mesh: Mesh, field: str = "input.batch_size") -> int:
  """This process's share of a global batch; fails early if it does not divide."""
  n_dev = mesh.size
  if global_batch % n_dev:
    layout = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    raise ValueError(f"{field}={global_batch} does not divide over {n_dev} devices (mesh {layout}); "
                     f"use a multiple of {n_dev}")
  return global_batch // jax.process_count()


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local rows into one global array per field."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Fetches (possibly multi-process) global arrays as full numpy arrays."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)


def map_padded(fn: Callable[[jax.Array], jax.Array], rows: np.ndarray, mesh: Mesh, max_batch: int) -> list[np.ndarray]:
  """`fn` (a jitted function of one global batch) over `rows` of this process, in device calls
  of at most `max_batch` rows (rounded down to whole devices), each padded with zeros to a power
  of two times the device count, so that a stream of ragged batches compiles a few shapes only.
  Returns the outputs of the real rows, one host array per call (none for no rows)."""
  devices = mesh.size
  cap = max(devices, max_batch // devices * devices)
  out = []
  for start in range(0, len(rows), cap):
    chunk = rows[start:start + cap]
    size = min(cap, devices * 2 ** int(np.ceil(np.log2(max(1, -(-len(chunk) // devices))))))
    padded = np.zeros((size, *chunk.shape[1:]), chunk.dtype)
    padded[:len(chunk)] = chunk
    batch = to_global({"rows": padded}, mesh)["rows"]
    out.append(np.asarray(to_host(fn(batch)))[:len(chunk)])
  return out
