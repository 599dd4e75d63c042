"""Orbax checkpoints of the train state together with the data position.

Each checkpoint step holds two items: `state` (model, optimizer, step) and
`data` (the Grain iterator's state as JSON), so a resumed run continues the
exact batch stream. Saves are asynchronous: Orbax copies device arrays to
host before `save` returns, so donating the state to the next step is safe.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from histojax import mesh as mesh_lib
from histojax import step as step_lib


def manager(workdir: epath.PathLike, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=cfg.every_steps, max_to_keep=cfg.max_to_keep,
      enable_async_checkpointing=cfg.async_save, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
  """Saves if `step` is on the interval (or `force`); returns whether it did.

  Every process calls this at every step (Orbax writes each process's shards
  of the state; the JSON is written by process 0 alone).
  """
  if not (force or mngr.should_save(step)):
    return False
  check_same_on_every_process(data_state)
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def check_same_on_every_process(data_state: dict) -> None:
  """Fails unless every process holds the same data-iterator state.

  Only process 0's JSON is saved. That is right because each process derives
  its share of every global batch from (seed, epoch, position) alone
  (data/samplers.py), so all iterator states are equal; this check keeps it
  right if a pipeline ever grows per-process state. One tiny all-gather per
  checkpoint.
  """
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).digest()
  multihost_utils.assert_equal(np.frombuffer(digest, np.uint8),
                               "data iterator state differs between processes; resuming would "
                               "replay a different stream on some of them")


def restore(mngr: ocp.CheckpointManager, step: int, like_state: Any) -> tuple[Any, dict]:
  """Restores step `step` into arrays shaped and sharded like `like_state`."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def restore_for_eval(config: ml_collections.ConfigDict, workdir: epath.PathLike, step: int | None = None):
  """(trainer, state, step) of checkpoint `step` (default the latest) in `workdir`.

  Restored straight into the abstract state (`step.abstract_trainer`): no
  model is initialised and no optimizer built only to be overwritten.
  """
  mesh = mesh_lib.make_mesh(config.mesh)
  trainer, abstract = step_lib.abstract_trainer(config, mesh)
  mngr = manager(workdir, config.checkpoint)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"no checkpoint {'' if step is None else f'at step {step} '}in "
                            f"{epath.Path(workdir) / 'checkpoints'} (have {list(mngr.all_steps())})")
  state, _ = restore(mngr, step, abstract)
  mngr.close()
  return trainer, state, step
