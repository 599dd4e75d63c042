"""Train state and the pure, jit-compiled steps over it.

The state is one pytree, `nnx.State` of (model, optimizer): parameters, batch
statistics, optimizer moments and the step counter. Steps are pure functions
`(state, batch, rng) -> (state, metrics)`, jitted over the mesh with the state
donated, so a step never holds two copies of the weights. The state is laid
out by `mesh.rules` (replicated, or split over `fsdp`); steps gather the
model's weights before computing with them, so the math does not depend on
the layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from histojax import mesh as mesh_lib
from histojax import objectives, optim
from histojax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything static about a run: how to rebuild modules from the state."""
  graphdef: Any
  objective: objectives.Objective
  lr_schedule: optax.Schedule
  mesh: Mesh
  state_sharding: Any = None  # where the state lives (replicated, or split over fsdp)
  tta: str = "none"  # config.eval.tta: how `embed` embeds (see there)


def _builder(config: ml_collections.ConfigDict):
  """(objective, a function building (model, optimizer), lr schedule) from the config.

  The objective decides the module tree (BYOL: online + target) and what the
  optimizer trains.
  """
  objective = objectives.build(config)
  tx, lr = optim.make_optimizer(config.optimizer, config.total_steps, config.finetune)

  def build():
    model = objective.build_model(config.seed)
    return model, nnx.Optimizer(model, tx, wrt=objective.trainable)

  return objective, build, lr


def _layout(build, config: ml_collections.ConfigDict, mesh: Mesh):
  """(graphdef, state as ShapeDtypeStructs carrying their shardings) of what `build` builds."""
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  shardings = sharding_lib.state_shardings(abstract, mesh, config.mesh)
  return graphdef, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh):
  """(graphdef, state as ShapeDtypeStructs carrying their shardings): the layout, no arrays.

  Enough to restore a checkpoint into, or to inspect what `mesh.rules` do.
  """
  _, build, _ = _builder(config)
  return _layout(build, config, mesh)


def abstract_trainer(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Trainer, nnx.State]:
  """`create` without creating: the Trainer and the abstract state (nothing initialised,
  no optimizer moments allocated), for restoring a checkpoint to evaluate or search."""
  objective, build, lr = _builder(config)
  graphdef, abstract = _layout(build, config, mesh)
  return (Trainer(graphdef, objective, lr, mesh, jax.tree.map(lambda a: a.sharding, abstract), config.eval.tta),
          abstract)


def create(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Trainer, nnx.State]:
  """Builds model and optimizer; returns the static half and the state, laid out by `mesh.rules`.

  Initialised eagerly, then placed: every process computes the same values
  from the seed and keeps its shards. (Initialising under jit straight into
  the sharding would skip the one-device copy, but XLA's fused initialisers
  differ from eager ones in the last bit, which changes every published
  result; the models here fit one device many times over.)
  """
  objective, build, lr = _builder(config)
  graphdef, abstract = _layout(build, config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  _, state = nnx.split(build())
  state = jax.device_put(state, shardings)
  return Trainer(graphdef, objective, lr, mesh, shardings, config.eval.tta), state


def gather_model(trainer: Trainer, state: nnx.State) -> nnx.State:
  """State with everything but the optimizer whole on every device (FSDP's all-gather).

  Inside a jitted step this tells XLA to gather split weights right before
  the forward pass and to reduce gradients back to shards; with a replicated
  state it is a no-op. The optimizer's moments (entry 1) stay split: the
  update runs shard by shard.
  """
  if trainer.state_sharding is None:
    return state
  return nnx.State({
      key: value if key == 1 else jax.lax.with_sharding_constraint(
          value, sharding_lib.compute_shardings(trainer.state_sharding[key]))
      for key, value in state.items()})


def step_of(state: nnx.State) -> int:
  """The optimizer's step counter, as a Python int."""
  return int(jax.device_get(state[1]["step"][...]))


def _global_norm(tree) -> jax.Array:
  return optax.global_norm(jax.tree.leaves(tree))


def train_step(trainer: Trainer, state: nnx.State, batch: dict, rng: jax.Array):
  """One optimizer update; rng is folded with the step so replays are exact."""
  model, optimizer = nnx.merge(trainer.graphdef, gather_model(trainer, state))
  model.train()
  step = optimizer.step[...]
  rng = jax.random.fold_in(rng, step)

  objective = trainer.objective

  def loss(m):
    return objective.loss(m, batch, rng)

  trainable = nnx.DiffState(0, objective.trainable)
  (loss_value, aux), grads = nnx.value_and_grad(loss, argnums=trainable, has_aux=True)(model)
  optimizer.update(model, grads)
  objective.after_update(model, step + 1)
  metrics = {
      "loss": loss_value,
      "grad_norm": _global_norm(grads),
      "param_norm": _global_norm(nnx.state(model, objective.trainable)),
      "lr": trainer.lr_schedule(step),
      **aux,
  }
  return nnx.state((model, optimizer)), metrics


def jit_train_step(trainer: Trainer, state: nnx.State):
  """`train_step` jitted over the mesh, state donated; the state keeps its layout."""
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  return jax.jit(
      lambda s, b, r: train_step(trainer, s, b, r),
      in_shardings=(state_sharding, mesh_lib.batch_sharding(trainer.mesh), mesh_lib.replicated(trainer.mesh)),
      out_shardings=(state_sharding, mesh_lib.replicated(trainer.mesh)),
      donate_argnums=0)


TTA_MODES = ("none", "d8")


def dihedral_views(images: jax.Array) -> list[jax.Array]:
  """The 8 flips and rotations of a [B, H, W, C] batch (square images): tissue has no 'up'."""
  views = [jnp.rot90(images, k, axes=(1, 2)) for k in range(4)]
  return views + [v[:, :, ::-1] for v in views]


def embed(trainer: Trainer, state: nnx.State, images: jax.Array) -> jax.Array:
  """Eval-mode embeddings (running batch statistics, no state change).

  With `eval.tta = "d8"` each image's embedding is the mean over its 8 flips
  and rotations, L2-normalised again: a single view's embedding still moves
  with orientation, which a tile of tissue does not have. Export and search
  both embed through here, so gallery and queries always agree.
  """
  model, _ = nnx.merge(trainer.graphdef, gather_model(trainer, state))
  model.eval()
  tta = trainer.tta
  if tta == "none":
    return trainer.objective.embed(model, images)
  if tta != "d8":
    raise ValueError(f"eval.tta must be one of {TTA_MODES}, got {tta!r}")
  total = sum(trainer.objective.embed(model, view).astype(jnp.float32) for view in dihedral_views(images))
  return total / jnp.maximum(jnp.linalg.norm(total, axis=-1, keepdims=True), 1e-12)


def jit_embed(trainer: Trainer):
  return jax.jit(lambda s, x: embed(trainer, s, x),
                 out_shardings=mesh_lib.batch_sharding(trainer.mesh))


def compile_report(compiled) -> str:
  """One line on what the compiled step will hold in device memory."""
  mem = compiled.memory_analysis()
  if mem is None:
    return "memory analysis unavailable on this backend"
  mib = lambda b: b / 2**20
  return (f"compiled step memory per device: arguments {mib(mem.argument_size_in_bytes):.1f} MiB, "
          f"outputs {mib(mem.output_size_in_bytes):.1f} MiB, temporaries {mib(mem.temp_size_in_bytes):.1f} MiB, "
          f"aliased {mib(mem.alias_size_in_bytes):.1f} MiB")


def batch_spec(config: ml_collections.ConfigDict, views: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a global training batch, for compiling ahead of step 1."""
  b, s = config.input.batch_size, config.input.image_size
  image = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8)
  names = ["image"] if views == 1 else [f"view{v + 1}" for v in range(views)]
  return {**{n: image for n in names}, "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
