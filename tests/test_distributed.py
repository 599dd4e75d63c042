"""Multi-process start-up decisions, per-process data shards, and the SIGTERM plumbing."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from histojax import distributed, preemption
from histojax.data import pipeline, sources
from tests import multiprocess
from tests.conftest import tiny_config

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3", "SLURM_STEP_NODELIST": "gpu[01-02]"}


@pytest.fixture
def no_tpu(monkeypatch):
  monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: False)


@pytest.mark.parametrize("environ,expected", [
    ({}, "single process"),
    (SLURM, "SLURM job step"),
    ({**SLURM, "SLURM_NTASKS": "1"}, "single process"),  # one task: nothing to join
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, "single process"),  # sbatch shell
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     "explicit coordinator address"),
])
def test_detect(no_tpu, environ, expected):
  assert distributed.detect("auto", environ=environ) == expected


def test_detect_modes(no_tpu, monkeypatch):
  assert distributed.detect("off", environ=SLURM) == "single process"
  assert distributed.detect("on", environ={}) == "requested (--distributed=on)"
  monkeypatch.setattr(distributed, "tpu_chips_attached", lambda: True)
  assert distributed.detect("auto", environ={}) == "Cloud TPU VM"
  with pytest.raises(ValueError, match="--distributed must be one of"):
    distributed.detect("yes", environ={})


def test_explicit_arguments_are_complete_and_consistent():
  with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
    distributed.explicit_args("10.0.0.1:1234", None, None, {})
  with pytest.raises(ValueError, match=r"process_id=4 is outside 0..num_processes-1"):
    distributed.explicit_args("10.0.0.1:1234", 4, 4, {})
  with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.explicit_args(None, None, None, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})
  # Flags win over the environment.
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"}
  assert distributed.explicit_args("g:2", None, 1, env) == {
      "coordinator_address": "g:2", "num_processes": 8, "process_id": 1}


def test_initialize_calls_jax_only_when_multi_process(no_tpu, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert distributed.initialize("auto", environ={}) == "single process"
  assert calls == []
  distributed.initialize("auto", environ=SLURM)
  assert calls == [{}]  # JAX reads SLURM's variables itself
  distributed.initialize("auto", "10.0.0.1:99", 2, 1, environ={})
  assert calls[-1] == {"coordinator_address": "10.0.0.1:99", "num_processes": 2, "process_id": 1}


def test_failed_start_up_says_what_was_detected_and_the_way_out(no_tpu, monkeypatch):
  def refuse(**kw):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  with pytest.raises(RuntimeError, match=r"detected: SLURM job step\): coordinator_address should be "
                                         r"defined\. Pass --distributed=off"):
    distributed.initialize("auto", environ=SLURM)


def _pci(root, name, vendor, device):
  d = root / name
  d.mkdir()
  (d / "vendor").write_text(vendor + "\n")
  (d / "device").write_text(device + "\n")


def test_tpu_detection_reads_the_pci_bus(tmp_path):
  _pci(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # gVNIC: Google's vendor id, not a TPU
  _pci(tmp_path, "0000:00:05.0", "0x10de", "0x2330")  # an NVIDIA H100
  assert not distributed.tpu_chips_attached(str(tmp_path))
  _pci(tmp_path, "0000:00:06.0", "0x1ae0", "0x005e")  # TPU v4
  assert distributed.tpu_chips_attached(str(tmp_path))


@pytest.mark.parametrize("sampler", ["m_per_class", "shuffle"])
def test_process_shards_assemble_the_single_process_batch(tiny_data_dir, sampler):
  """Two processes' local batches, stacked, are one process's global batch: same
  examples, same crops and rotations (augmentation is keyed on the global position)."""
  config = tiny_config(tiny_data_dir)
  config.input.sampler = sampler
  source = sources.open_split(config.dataset.name, "train", tiny_data_dir)
  labels = sources.read_metadata(source)["label"]

  def batches(index, count, n=5):  # 5 batches of 24 cross the 48-example epoch boundary
    it = iter(pipeline.train_dataset(source, labels, config.input, config.seed, index, count))
    return [next(it) for _ in range(n)]

  whole = batches(0, 1)
  halves = [batches(p, 2) for p in range(2)]
  for b, full in enumerate(whole):
    for key in ("image", "label"):
      stacked = np.concatenate([halves[0][b][key], halves[1][b][key]])
      np.testing.assert_array_equal(stacked, full[key], err_msg=f"batch {b} {key}")
  assert not np.array_equal(whole[0]["image"], whole[1]["image"])


def test_watcher_turns_sigterm_into_a_stop_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watcher() as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not watcher.reached(2) and time.monotonic() < deadline:
      time.sleep(0.01)
    assert watcher.reached(2)
  assert signal.getsignal(signal.SIGTERM) == before


_ORPHAN = r"""
import multiprocessing as mp, os, sys, time
from histojax import preemption

def worker():
  preemption.shield_worker(0, 1)
  print("shielded", flush=True)
  time.sleep(60)

child = mp.get_context("fork").Process(target=worker)
child.start()
print(child.pid, flush=True)
sys.stdin.readline()  # the test SIGTERMs the child, then lets this parent go
os._exit(0)  # no atexit join: the child is orphaned, as when a trainer is killed
"""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie has exited; only its parent (init, for an orphan) has yet to reap it.
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(")")[-1].split()[0] != "Z"


def test_grain_worker_shield_ignores_sigterm_and_exits_when_orphaned():
  parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], cwd=multiprocess.REPO,
                            env=multiprocess.env_with_devices(1), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  try:
    lines = {parent.stdout.readline().strip() for _ in range(2)}
    assert "shielded" in lines, lines
    child = int((lines - {"shielded"}).pop())
    os.kill(child, signal.SIGTERM)
    time.sleep(1.0)
    assert _alive(child), "the shielded worker died of SIGTERM"
    parent.stdin.write("\n")
    parent.stdin.flush()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not _alive(child), "the orphaned worker kept running"
  finally:
    parent.kill()
