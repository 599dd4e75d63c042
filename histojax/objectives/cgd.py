"""CGD (Jun et al., 2019): ranking loss on the combined descriptor plus an
auxiliary classification loss on the first global descriptor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from histojax.objectives.base import OBJECTIVES, Objective
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


@OBJECTIVES.register("cgd", defaults=lambda: ml_collections.ConfigDict(
    dict(margin=0.1, temperature=0.5, label_smoothing=0.1)))
class CGD(Objective):
  """Needs the cgd head with its auxiliary classifier (`model.head.num_classes`)."""

  def loss(self, model, batch, rng):
    outputs = model.outputs(self.augment(batch["image"], rng))
    if "aux_logits" not in outputs:
      raise ValueError("objective 'cgd' needs the cgd head with an auxiliary classifier: "
                       "base_config(head='cgd') and model.head.num_classes > 0 (or -1 for the dataset's)")
    c = self.cfg
    return cgd_loss(outputs["embedding"], outputs["aux_logits"], batch["label"], margin=c.margin,
                    temperature=c.temperature, smoothing=c.label_smoothing)
