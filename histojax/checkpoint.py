"""Orbax checkpoints of the train state together with the data position.

Each checkpoint step holds two items: `state` (model, optimizer, step) and
`data` (the Grain iterator's state as JSON), so a resumed run continues the
exact batch stream. Saves are asynchronous: Orbax copies device arrays to
host before `save` returns, so donating the state to the next step is safe.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath


def manager(workdir: epath.PathLike, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=cfg.every_steps, max_to_keep=cfg.max_to_keep,
      enable_async_checkpointing=cfg.async_save, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options,
                               item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
  """Saves if `step` is on the interval (or `force`); returns whether it did."""
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def restore(mngr: ocp.CheckpointManager, step: int, like_state: Any) -> tuple[Any, dict]:
  """Restores step `step` into arrays shaped and sharded like `like_state`."""
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]
