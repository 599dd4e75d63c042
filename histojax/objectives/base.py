"""The objective registry and the contract every objective keeps.

An objective owns how one method trains and what it serves:
- `build_model(seed)`: the module tree trained (an Embedder, or a composite
  such as BYOL's online + target networks);
- `trainable`: the NNX filter of variables the optimizer updates (BYOL's
  target network is excluded: it moves by EMA, never by gradient);
- `loss(model, batch, rng) -> (loss, aux)`: on the *global* batch, so
  similarities include negatives from every device; aux holds scalar
  diagnostics for the log;
- `after_update(model, step)`: work after the optimizer step (BYOL's EMA);
- `embed(model, images)`: the retrieval embedding used by export and search;
- `codebooks(model)`: (codebooks [M, K, d/M], PQ metric) when the gallery is
  stored as product-quantisation codes and searched by ADC (SPQ), else None;
- `load_weights(state, directory)`: `config.init_from` into the train state;
- `views`: how many augmented views per example the input pipeline makes.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from histojax import models, weights
from histojax.data import colour
from histojax.registry import Registry

OBJECTIVES = Registry("objective")


class Objective:
  views = 1
  trainable = nnx.Param

  def __init__(self, cfg: ml_collections.ConfigDict, model: ml_collections.ConfigDict,
               augment: ml_collections.ConfigDict, total_steps: int):
    self.cfg = cfg  # config.objective: the method's own knobs
    self.model_cfg = model  # config.model: what build_model builds
    self.augment_cfg = augment  # config.augment: the colour views
    self.total_steps = total_steps  # schedules inside the objective (BYOL's target decay)

  def build_model(self, seed: int) -> nnx.Module:
    return models.build_model(self.model_cfg, seed=seed)

  def loss(self, model, batch: dict, rng: jax.Array):
    raise NotImplementedError

  def after_update(self, model, step) -> None:
    del model, step

  def embed(self, model, images):
    return model(images)

  def codebooks(self, model):
    """The PQ hook export reads: None, or (float32 codebooks [M, K, d/M], metric)
    with which `pq.encode` codes the exported embeddings."""
    del model
    return None

  def load_weights(self, state, directory):
    return weights.init_train_state(state, directory)

  def augment(self, images, rng: jax.Array, view: int = 1):
    """Device-side colour augmentation of one view (identity when configured off)."""
    return colour.augment(images, rng, self.augment_cfg[f"view{view}"])


def build(config: ml_collections.ConfigDict) -> Objective:
  """The run's objective, given the config sections it reads and nothing else."""
  return OBJECTIVES.get(config.objective.name)(config.objective, model=config.model, augment=config.augment,
                                               total_steps=config.total_steps)
