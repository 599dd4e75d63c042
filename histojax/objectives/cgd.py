"""CGD (Jun et al., 2019): ranking loss on the combined descriptor plus an
auxiliary classification loss on the first global descriptor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from histojax.objectives.metric import batch_hard_triplet_loss


def smoothed_cross_entropy(logits, labels, *, temperature: float = 0.5, smoothing: float = 0.1):
  """Cross-entropy of logits / temperature against labels smoothed by `smoothing`.

  Temperature scaling below 1 sharpens the softmax, which CGD found to help
  the auxiliary classifier learn discriminative features.
  """
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32) / temperature, targets))


def cgd_loss(embeddings, logits, labels, *, margin=0.1, temperature=0.5, smoothing=0.1):
  ranking, aux = batch_hard_triplet_loss(embeddings, labels, margin=margin)
  classification = smoothed_cross_entropy(logits, labels, temperature=temperature, smoothing=smoothing)
  accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return ranking + classification, {**aux, "ranking_loss": ranking, "classification_loss": classification,
                                    "train_accuracy": accuracy}
