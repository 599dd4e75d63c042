"""BYOL (Grill et al., NeurIPS 2020): predict a slow-moving target's projection.

The online network (encoder, projector, predictor) is trained by gradient;
the target network (encoder, projector) is an exponential moving average of
the online one, updated after each optimizer step with a decay that follows
a cosine schedule from `base` to 1. Both live in the one train state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from histojax.objectives.base import OBJECTIVES, Objective
from histojax.weights import store


def regression_loss(prediction, target):
  """Normalised MSE: ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), mean over the batch."""
  p = prediction.astype(jnp.float32)
  z = jax.lax.stop_gradient(target.astype(jnp.float32))
  p = p / jnp.sqrt(jnp.maximum(jnp.sum(p * p, -1, keepdims=True), 1e-12))
  z = z / jnp.sqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))
  return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, -1))


def target_decay(step, total_steps: int, base: float = 0.996):
  """tau_k = 1 - (1 - base) * (cos(pi k / K) + 1) / 2: base at step 0, 1 at the end."""
  progress = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema(target, online, tau):
  """tau * target + (1 - tau) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: tau * t + (1.0 - tau) * o.astype(t.dtype), target, online)


class BYOLNet(nnx.Module):
  """The online embedder (byol head: projector, predictor, probe) and its target.

  The target starts as an exact copy; it is trained by `ema`, never by the
  optimizer (see `BYOL.trainable`). Its predictor and probe are never used.
  """

  def __init__(self, online: nnx.Module):
    self.online = online
    self.target = nnx.clone(online)
    # A clone shares the online arrays; the target needs its own buffers, or
    # donating the train state would donate each buffer twice.
    nnx.update(self.target, jax.tree.map(jnp.copy, nnx.state(self.target)))

  def __call__(self, images):
    return self.online(images)


def _stop_target(path, value):
  del value
  return "target" not in path


@OBJECTIVES.register("byol", defaults=lambda: ml_collections.ConfigDict(dict(base_decay=0.996)))
class BYOL(Objective):
  views = 2
  # Everything but the target network; its moments would be wasted memory.
  trainable = nnx.All(nnx.Param, _stop_target)

  def build_model(self, seed):
    if self.model_cfg.get("head", {}).get("name") != "byol":
      raise ValueError("objective 'byol' needs the byol head: base_config(objective='byol', head='byol')")
    return BYOLNet(super().build_model(seed))

  def loss(self, model, batch, rng):
    k1, k2 = jax.random.split(rng)
    view1 = self.augment(batch["view1"], k1, view=1)
    view2 = self.augment(batch["view2"], k2, view=2)
    online1, online2 = model.online.outputs(view1), model.online.outputs(view2)
    target = model.target
    target1 = target.head.project(target.features(view1))
    target2 = target.head.project(target.features(view2))
    # Symmetric: each view's prediction regresses the other view's target projection.
    byol_loss = regression_loss(online1["prediction"], target2) + regression_loss(online2["prediction"], target1)
    aux = {"byol_loss": byol_loss}
    loss = byol_loss
    if "probe_logits" in online1:  # labels only for monitoring: the probe sees stop-gradient features
      labels = jax.nn.one_hot(batch["label"], online1["probe_logits"].shape[-1])
      probe_loss = jnp.mean(optax.softmax_cross_entropy(online1["probe_logits"], labels))
      aux.update(probe_loss=probe_loss, probe_accuracy=jnp.mean(
          (jnp.argmax(online1["probe_logits"], -1) == batch["label"]).astype(jnp.float32)))
      loss = loss + probe_loss
    return loss, aux

  def after_update(self, model, step):
    tau = target_decay(step, self.total_steps, self.cfg.base_decay)
    nnx.update(model.target, ema(nnx.state(model.target, nnx.Param), nnx.state(model.online, nnx.Param), tau))

  def embed(self, model, images):
    return model.online(images)

  def load_weights(self, state, directory):
    model_state = state[0]
    model_state["online"] = store.apply(model_state["online"], directory)
    model_state["target"] = store.apply(model_state["target"], directory)  # the copy starts equal
    state[0] = model_state
    return state
