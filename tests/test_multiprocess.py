"""Multi-process training on localhost: the same numbers as one process, and preemption.

Every job here is the real command line (`python -m histojax.train ...`),
started once per process as on a pod, with 127.0.0.1 as coordinator.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from histojax import checkpoint, evaluate, identity, train
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from histojax import evaluators
from tests import multiprocess
from tests.conftest import tiny_config

# Short runs of the quickstart's tiny variant; evaluation is covered elsewhere.
QUICK = {"eval.at_end": False, "log_every": 1}


def _config(data_dir, overrides):
  config = tiny_config(data_dir)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def _restore(config, workdir, step=None):
  """(state as numpy, data state) of a checkpoint, restored onto this process's 8 devices."""
  mngr = checkpoint.manager(workdir, config.checkpoint)
  _, like = step_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  step = mngr.latest_step() if step is None else step
  state, data_state = checkpoint.restore(mngr, step, like)
  mngr.close()
  return jax.tree.map(np.asarray, state), data_state


def _max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# Training that is smooth in the parameters, so that equal math gives equal numbers:
# Gloo sums gradients across processes in another order than one process does, and
# two things turn that last-bit difference into visible ones. AdamW's first updates
# are ~lr * sign(g) even for gradients near zero; SGD's are linear in g. And the
# Multi-Similarity loss mines pairs by thresholds, so a pair at the threshold can flip
# (measured: 1.6e-5 relative loss jump at step 4); epsilon=2 keeps every pair.
EQUAL = {**QUICK, "optimizer.name": "sgd", "optimizer.lr": 0.01, "optimizer.warmup_steps": 0,
         "objective.epsilon": 2.0}


def test_two_processes_train_like_one(tmp_path, tiny_data_dir, record_property):
  """2 processes x 4 devices == 1 process x 8 devices: losses and final state."""
  job = multiprocess.launch(multiprocess.train_command(tmp_path / "2x4", tiny_data_dir, EQUAL),
                            num_processes=2, devices_per_process=4, log_dir=tmp_path / "logs")
  assert job.wait() == [0, 0], job.tails()

  config = _config(tiny_data_dir, EQUAL)
  train.train_and_evaluate(config, tmp_path / "1x8")

  two = multiprocess.logged_steps(tmp_path / "2x4")
  one = multiprocess.logged_steps(tmp_path / "1x8")
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
  losses2, losses1 = [r["loss"] for r in two], [r["loss"] for r in one]
  np.testing.assert_allclose(losses2, losses1, rtol=1e-5)  # as tests/test_step.py: 8 vs 1 device
  assert len(set(losses1)) == 4  # training moved: the comparison is not between constants

  state2, data2 = _restore(config, tmp_path / "2x4")
  state1, data1 = _restore(config, tmp_path / "1x8")
  # Each process read half of every global batch; the saved position is the global one.
  assert data2 == data1 == {"next_index": 4}
  assert int(state2[1]["step"]) == 4
  diff = _max_abs_diff(state2, state1)
  params = _max_abs_diff(state2[0], state1[0])
  print(f"2x4 vs 1x8: losses {losses2} vs {losses1}; max |difference| params+batch stats "
        f"{params:.3g}, whole state {diff:.3g}")
  record_property("max_state_diff", diff)
  # Parameters and batch-norm statistics (over the global batch): to 1e-6. The momentum
  # buffers are sums of gradients, which are sums over the batch with heavy cancellation
  # (conv1, through batch norm): there the summation order shows at a few 1e-6.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state2), jax.tree.leaves(state1)):
    atol = 1e-6 if path[0].key == 0 else 1e-5
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_sigterm_to_one_process_stops_all_with_a_checkpoint(tmp_path, tiny_data_dir):
  """SIGTERM reaches one worker of a 2-process FSDP job: both save the same step and exit 0;
  a single process with a replicated layout resumes from it."""
  overrides = {**QUICK, "total_steps": 10_000, "checkpoint.every_steps": 10_000,
               "mesh.fsdp": 2, "mesh.fsdp_min_size": 0}
  workdir = tmp_path / "run"
  job = multiprocess.launch(multiprocess.train_command(workdir, tiny_data_dir, overrides),
                            num_processes=2, devices_per_process=4, log_dir=tmp_path / "logs")
  multiprocess.wait_for_step(job, workdir, 2)
  job.procs[1].send_signal(signal.SIGTERM)
  assert job.wait() == [0, 0], job.tails()

  # Orbax also saves the first step; the other checkpoint is the preemption's.
  saved = checkpoint.manager(workdir, _config(tiny_data_dir, overrides).checkpoint).all_steps()
  assert len(saved) == 2 and saved[0] == 1, saved
  stop = saved[1]
  assert 2 < stop < 10_000
  assert multiprocess.logged_steps(workdir)[-1]["step"] == stop
  assert "stopped at step %d (SIGTERM)" % stop in job.logs[0].read_text()

  # Resume on one process, 8 devices, parameters replicated: Orbax re-lays the shards.
  config = _config(tiny_data_dir, {**overrides, "mesh.fsdp": 1})
  state, data_state = _restore(config, workdir, stop)
  assert int(state[1]["step"]) == stop and data_state == {"next_index": stop}
  assert train.train_and_evaluate(config, workdir, stop_at=stop + 1) == {}
  resumed, data_state = _restore(config, workdir, stop + 1)
  assert int(resumed[1]["step"]) == stop + 1 and data_state == {"next_index": stop + 1}
  assert multiprocess.logged_steps(workdir)[-1]["step"] == stop + 1


def test_sigterm_to_process_group_leaves_restorable_checkpoint(tmp_path, tiny_data_dir):
  """One process with a Grain worker; SIGTERM to the whole group, as a VM shutdown sends it."""
  overrides = {**QUICK, "total_steps": 10_000, "checkpoint.every_steps": 10_000,
               "input.num_workers": 1}
  workdir = tmp_path / "run"
  job = multiprocess.launch(multiprocess.train_command(workdir, tiny_data_dir, overrides),
                            num_processes=1, devices_per_process=8, log_dir=tmp_path / "logs",
                            new_session=True)
  multiprocess.wait_for_step(job, workdir, 2)
  os.killpg(job.procs[0].pid, signal.SIGTERM)
  assert job.wait() == [0], job.tails()

  config = _config(tiny_data_dir, overrides)
  mngr = checkpoint.manager(workdir, config.checkpoint)
  saved = mngr.all_steps()
  mngr.close()
  assert len(saved) == 2 and saved[0] == 1 and saved[1] >= 2, saved  # Orbax's first save, then ours
  stop = saved[1]
  assert multiprocess.logged_steps(workdir)[-1]["step"] == stop
  state, data_state = _restore(config, workdir, stop)
  assert int(state[1]["step"]) == stop
  # Behind a Grain worker the iterator state nests the worker's own position.
  assert data_state["iterators_in_use_states"] == [{"next_index": stop}], data_state
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state[0]))




_CHECK = r"""
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from histojax import checkpoint
checkpoint.check_same_on_every_process({"next_index": 5})
print("same state: accepted", flush=True)
try:
  checkpoint.check_same_on_every_process({"next_index": 5 + jax.process_index()})
except AssertionError as e:
  print("different states: refused:", e, flush=True)
"""


def test_iterator_states_are_compared_across_processes():
  """Only process 0's iterator JSON is saved; a save refuses when the processes disagree."""
  address = f"127.0.0.1:{multiprocess.free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", _CHECK, address, str(i)], cwd=multiprocess.REPO,
                            env=multiprocess.env_with_devices(1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
    assert "same state: accepted" in out, out
    assert "different states: refused: data iterator state differs between processes" in out, out


def test_two_processes_fsdp_evaluate_like_one(tmp_path, tiny_data_dir):
  """2 processes x 4 devices, parameters split over fsdp across them, evaluation on.

  The weights fingerprint hashes whole arrays, not each process's shard, so the
  processes agree on it (`identity.fingerprint` asserts so across processes) and it
  equals the one a single process computes from the same checkpoint, which
  therefore reuses the export and index the 2-process job wrote and scores them alike.
  """
  overrides = {**EQUAL, "eval.at_end": True, "mesh.fsdp": 2, "mesh.fsdp_min_size": 0,
               "eval.every_steps": 2, "eval.during.gallery_rows": 20, "eval.during.query_rows": 10}
  workdir = tmp_path / "2x4"
  job = multiprocess.launch(multiprocess.train_command(workdir, tiny_data_dir, overrides),
                            num_processes=2, devices_per_process=4, log_dir=tmp_path / "logs")
  assert job.wait(timeout=900) == [0, 0], job.tails()  # training, then evaluation
  two = json.loads((workdir / "eval" / "metrics.json").read_text())
  exported = json.loads((workdir / "export" / "train" / "manifest.json").read_text())

  config = _config(tiny_data_dir, overrides)
  trainer, state, step = checkpoint.restore_for_eval(config, workdir)
  assert step == 4 and identity.fingerprint(trainer, state) == exported["fingerprint"]
  config.mesh.fsdp = 1  # the same weights replicated: the fingerprint does not depend on the layout
  trainer, state, _ = checkpoint.restore_for_eval(config, workdir)
  assert identity.fingerprint(trainer, state) == exported["fingerprint"]
  index_written = (workdir / "index" / "manifest.json").stat().st_mtime_ns
  one = evaluate.evaluate(config, workdir)
  assert (workdir / "index" / "manifest.json").stat().st_mtime_ns == index_written  # reused, not rebuilt
  assert one == two and two["num_query"] > 0 and 0.0 <= two["map@10"] <= 1.0

  # Evaluation during training: both processes embedded their halves of every batch with the
  # weights split across them; process 0 logged step 2 (step 4 is the full evaluation's), and
  # one process scoring the same rows with step 2's weights, replicated, gets the same numbers.
  during = [row for row in multiprocess.logged_steps(workdir) if "during/seconds" in row]
  assert [row["step"] for row in during] == [2]
  trainer, state, _ = checkpoint.restore_for_eval(config, workdir, step=2)
  alone = evaluators.from_config(config, trainer).run(state)
  scores = lambda row: {k: v for k, v in row.items() if "@" in k}  # noqa: E731
  assert len(scores(alone)) == 3 * len(config.eval.ks)
  assert scores(alone) == pytest.approx(scores(during[0]), abs=1e-9)
