"""BYOL (Grill et al., NeurIPS 2020): predict a slow-moving target's projection.

The online network (encoder, projector, predictor) is trained by gradient;
the target network (encoder, projector) is an exponential moving average of
the online one, updated after each optimizer step with a decay that follows
a cosine schedule from `base` to 1. Both live in the one train state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
