"""Multi-process start-up: one command, run by every process of the job.

Every process of a run executes the same command; JAX's multi-controller
runtime joins them into one job whose mesh spans all their devices. A run is
multi-process when any of these holds (checked in this order):

1. explicit: `--coordinator_address`, `--num_processes`, `--process_id`, or the
   environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
   JAX_PROCESS_ID (a generic cluster; process 0 listens on the address);
2. a Cloud TPU VM: TPU chips are attached, and JAX reads the slice's workers
   from the metadata server (a single-host slice is a job of one process,
   which still gets JAX's preemption notices);
3. SLURM inside `srun` with more than one task (one task per GPU), or
   Open MPI's `mpirun` with more than one rank: JAX reads their environment.

`--distributed=off` forces a single process, `--distributed=on` calls
`jax.distributed.initialize()` with JAX's own detection whatever the
environment says. Initialisation must happen before any JAX computation.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import jax
from absl import flags

MODES = ("auto", "on", "off")
# What srun sets in each of its tasks: the variables JAX's own SLURM detection reads.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# TPU chips on the PCI bus: Google's vendor id and the chips' device ids (v3 .. 7x),
# as JAX itself checks them. The vendor id alone would also match gVNIC network
# cards on ordinary GCE VMs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


def define_flags() -> None:
  """Flags for the entry points (train, evaluate); call under `__main__`."""
  flags.DEFINE_enum("distributed", "auto", MODES,
                    "Multi-process start-up: auto-detect (TPU VM, SLURM, Open MPI, explicit "
                    "address), always (on), or never (off).")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for a generic cluster (or $JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (or $JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (or $JAX_PROCESS_ID).")


def initialize_from_flags() -> None:
  f = flags.FLAGS
  initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id)


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               environ: dict | None = None) -> str:
  """Joins the multi-process job if there is one; returns how it decided."""
  reason = detect(mode, coordinator_address, num_processes, process_id, environ)
  if reason == "single process":
    return reason
  env = os.environ if environ is None else environ
  explicit = explicit_args(coordinator_address, num_processes, process_id, env)
  try:
    jax.distributed.initialize(**explicit)  # {}: JAX detects the cluster itself
  except (RuntimeError, ValueError) as e:
    raise RuntimeError(
        f"joining the multi-process job failed (detected: {reason}): {str(e).rstrip('.')}. "
        f"Pass --distributed=off "
        f"to run as a single process, or give --coordinator_address, --num_processes and "
        f"--process_id.") from e
  return reason


def explicit_args(coordinator_address, num_processes, process_id, environ) -> dict:
  """The generic-cluster arguments from flags, else the environment; {} if none given."""
  address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else _env_int(environ, "JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _env_int(environ, "JAX_PROCESS_ID")
  given = {"coordinator_address": address, "num_processes": count, "process_id": index}
  if not any(v is not None for v in given.values()):
    return {}
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"a generic multi-process run needs coordinator_address, num_processes and "
                     f"process_id; missing {missing} (flags --{' --'.join(missing)} or the JAX_* "
                     f"environment variables)")
  if not 0 <= index < count:
    raise ValueError(f"process_id={index} is outside 0..num_processes-1 (num_processes={count})")
  return given


def detect(mode: str, coordinator_address=None, num_processes=None, process_id=None,
           environ: dict | None = None) -> str:
  """Why this run is (or is not) multi-process, as a short phrase."""
  env = os.environ if environ is None else environ
  if mode not in MODES:
    raise ValueError(f"--distributed must be one of {MODES}, got {mode!r}")
  if mode == "off":
    return "single process"
  if explicit_args(coordinator_address, num_processes, process_id, env):
    return "explicit coordinator address"
  if mode == "on":
    return "requested (--distributed=on)"
  if tpu_chips_attached():
    return "Cloud TPU VM"
  if all(k in env for k in _SLURM_STEP) and _env_int(env, "SLURM_NTASKS", 1) > 1:
    return "SLURM job step"
  if "OMPI_MCA_orte_hnp_uri" in env and _env_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
    return "Open MPI"
  return "single process"


def tpu_chips_attached(sysfs: str = "/sys/bus/pci/devices") -> bool:
  """True on a Cloud TPU VM (the PCI check JAX makes before loading libtpu)."""
  for vendor in glob.glob(os.path.join(sysfs, "*", "vendor")):
    try:
      if Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
        continue
      if Path(vendor).with_name("device").read_text().strip() in _known_tpu_devices():
        return True
    except OSError:
      continue
  return False


def _known_tpu_devices() -> frozenset:
  # JAX's table follows new TPU generations with each release; ours is the fallback.
  try:  # a private JAX module, imported late and guarded: a JAX release may move or drop it
    from jax._src import hardware_utils  # noqa: PLC0415
    return _TPU_PCI_DEVICES | frozenset(hardware_utils._TPU_PCI_DEVICE_IDS)
  except (ImportError, AttributeError):
    return _TPU_PCI_DEVICES


def _env_int(environ, name: str, default: int | None = None) -> int | None:
  value = environ.get(name)
  if value is None or value == "":
    return default
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def describe() -> str:
  """One line on the job's shape, for the run's log."""
  return (f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices "
          f"({jax.local_device_count()} local to process {jax.process_index()})")
