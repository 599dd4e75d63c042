"""Label-free contrastive pieces shared by the self-supervised objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _unit(x):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))


def nt_xent(a, b, *, temperature: float = 0.5):
  """NT-Xent (SimCLR) over the 2N items [a; b], positives a_i <-> b_i.

  Each of the 2N items is classified against the other 2N - 1 by cosine
  similarity / temperature; the loss is the mean cross-entropy of picking
  its partner. With the global batch, negatives come from every device.
  """
  reps = _unit(jnp.concatenate([a, b], axis=0))
  n = a.shape[0]
  logits = reps @ reps.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  partner = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  log_prob = jax.nn.log_softmax(logits, axis=1)
  return -jnp.mean(log_prob[jnp.arange(2 * n), partner])


def cross_quantized_contrastive_loss(features_1, quantized_1, features_2, quantized_2, *,
                                     temperature: float = 0.5):
  """SPQ's cross-quantised contrastive loss (Jang & Cho, 2021, eq. 5):
  the features of one view against the soft-quantised features of the other,
  both ways, averaged."""
  return 0.5 * (nt_xent(features_1, quantized_2, temperature=temperature)
                + nt_xent(features_2, quantized_1, temperature=temperature))
