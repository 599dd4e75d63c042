"""Multi-Similarity loss against a hand-worked example and the authors' algorithm."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from histojax.objectives.metric import multi_similarity_loss


def test_ms_loss_hand_example():
  # Unit vectors with round cosines: S01=.8, S02=0, S03=.6, S12=.6, S13=.96, S23=.8.
  emb = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
  labels = jnp.array([0, 0, 1, 1])
  # Anchor 0: hardest positive .8; negatives need S + .1 > .8: none (0, .6) -> inactive.
  # Anchor 2: same picture (positive .8, negatives 0 and .6) -> inactive.
  # Anchors 1 and 3: positive .8 kept (.8 - .1 < .96), negative .96 kept, .6 dropped:
  #   1/2 log(1 + e^{-2(.8-.5)}) + 1/5 log(1 + e^{5(.96-.5)})
  per_anchor = 0.5 * math.log(1 + math.exp(-0.6)) + 0.2 * math.log(1 + math.exp(2.3))
  assert per_anchor == pytest.approx(0.697853, abs=1e-6)
  loss, aux = multi_similarity_loss(emb, labels)
  assert float(loss) == pytest.approx(2 * per_anchor / 4, rel=1e-6)
  assert float(aux["active_anchors"]) == pytest.approx(0.5)


def _reference_ms(emb, labels, alpha=2.0, beta=5.0, base=0.5, eps=0.1):
  """The authors' per-anchor loop (Wang et al. 2019), in plain Python."""
  sim = emb @ emb.T
  total = 0.0
  for i in range(len(labels)):
    pos = [sim[i, j] for j in range(len(labels)) if j != i and labels[j] == labels[i]]
    neg = [sim[i, j] for j in range(len(labels)) if labels[j] != labels[i]]
    neg_kept = [s for s in neg if s + eps > min(pos)]
    pos_kept = [s for s in pos if s - eps < max(neg)]
    if not neg_kept or not pos_kept:
      continue
    total += 1 / alpha * math.log(1 + sum(math.exp(-alpha * (s - base)) for s in pos_kept))
    total += 1 / beta * math.log(1 + sum(math.exp(beta * (s - base)) for s in neg_kept))
  return total / len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ms_loss_matches_reference_loop(seed):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(16, 8))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = np.repeat(np.arange(4), 4)
  loss, _ = multi_similarity_loss(jnp.asarray(emb, jnp.float32), jnp.asarray(labels))
  assert float(loss) == pytest.approx(_reference_ms(emb, labels), rel=1e-5)


def test_ms_loss_is_stable_for_large_similarities():
  emb = jnp.ones((4, 3)) / jnp.sqrt(3.0)  # every similarity 1: exp(beta * .5) terms
  loss, _ = multi_similarity_loss(emb, jnp.array([0, 0, 1, 1]), beta=200.0)
  assert np.isfinite(float(loss))
