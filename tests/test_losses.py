"""Losses of every method against small examples worked out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histojax.objectives import byol, cgd, contrastive, metric

# Unit vectors with round cosines: cos01 = 0, cos02 = .6, cos12 = .8.
E = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
D01, D02, D12 = math.sqrt(2.0), math.sqrt(0.8), math.sqrt(0.4)  # sqrt(2 - 2 cos)


def test_contrastive_by_hand():
  loss, aux = metric.contrastive_loss(E, jnp.array([0, 0, 1]), margin=1.0)
  pos = D01**2  # the one positive pair (0, 1)
  neg = ((1 - D02) ** 2 + (1 - D12) ** 2) / 2  # negatives (0, 2) and (1, 2)
  assert float(aux["pos_loss"]) == pytest.approx(pos, rel=1e-5)
  assert float(loss) == pytest.approx(pos + neg, rel=1e-5)
  # With margin .5 both negatives are already farther than the margin.
  assert float(metric.contrastive_loss(E, jnp.array([0, 0, 1]), margin=0.5)[1]["neg_loss"]) == 0.0


def test_batch_hard_triplet_by_hand():
  # Anchor 0: farthest positive 1, nearest negative 2; anchor 1 likewise; anchor 2 has no positive.
  loss, _ = metric.batch_hard_triplet_loss(E, jnp.array([0, 0, 1]), margin=0.1)
  expected = ((D01 - D02 + 0.1) + (D01 - D12 + 0.1)) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_triplet_is_zero_when_classes_are_separated():
  emb = jnp.array([[1.0, 0.0], [0.99, 0.141], [-1.0, 0.0], [-0.99, 0.141]])
  assert float(metric.batch_hard_triplet_loss(emb, jnp.array([0, 0, 1, 1]), margin=0.1)[0]) == 0.0


def test_divergence_by_hand():
  sub = E[None]  # one image, three learners
  # Squared distances between learners: 2, .8, .4; margin 3 -> 1 + 2.2 + 2.6.
  assert float(metric.divergence_loss(sub, margin=3.0)) == pytest.approx(5.8, rel=1e-5)
  assert float(metric.divergence_loss(sub, margin=0.2)) == 0.0


def test_abe_loss_combines_learners_and_divergence():
  rng = np.random.default_rng(0)
  sub = rng.normal(size=(8, 3, 4)).astype(np.float32)
  sub /= np.linalg.norm(sub, axis=-1, keepdims=True)
  labels = jnp.repeat(jnp.arange(4), 2)
  loss, aux = metric.abe_loss(jnp.asarray(sub), labels, margin_c=0.5, lambda_div=0.05, margin_div=0.2)
  learners = sum(float(metric.contrastive_loss(jnp.asarray(sub[:, m]), labels, margin=0.5)[0]) for m in range(3))
  assert float(aux["metric_loss"]) == pytest.approx(learners, rel=1e-5)
  assert float(loss) == pytest.approx(learners + 0.05 * float(aux["divergence"]), rel=1e-5)


def test_smoothed_cross_entropy_by_hand():
  logits = jnp.array([[1.0, 0.0]])
  # logits / .5 = (2, 0): log p = (2 - log(e^2 + 1), -log(e^2 + 1)); targets (.95, .05).
  lse = math.log(math.exp(2) + 1)
  expected = -(0.95 * (2 - lse) + 0.05 * (-lse))
  got = cgd.smoothed_cross_entropy(logits, jnp.array([0]), temperature=0.5, smoothing=0.1)
  assert float(got) == pytest.approx(expected, rel=1e-6)


def test_cgd_loss_is_ranking_plus_classification():
  labels = jnp.array([0, 0, 1])
  logits = jnp.array([[2.0, 0.0], [1.0, 0.5], [0.0, 3.0]])
  loss, aux = cgd.cgd_loss(E, logits, labels)
  ranking = float(metric.batch_hard_triplet_loss(E, labels, margin=0.1)[0])
  ce = float(cgd.smoothed_cross_entropy(logits, labels))
  assert float(loss) == pytest.approx(ranking + ce, rel=1e-6)
  assert float(aux["train_accuracy"]) == 1.0


def test_nt_xent_by_hand():
  a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  b = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  # Item a0's others: b0 (cos 1), a1 (0), b1 (0); at temperature 1: -log(e / (e + 2)). Same for all 4.
  expected = -math.log(math.e / (math.e + 2))
  assert float(contrastive.nt_xent(a, b, temperature=1.0)) == pytest.approx(expected, rel=1e-6)


def test_cross_quantized_loss_pairs_features_with_other_views_codes():
  rng = np.random.default_rng(1)
  x1, z1, x2, z2 = (jnp.asarray(rng.normal(size=(4, 6)), jnp.float32) for _ in range(4))
  got = contrastive.cross_quantized_contrastive_loss(x1, z1, x2, z2, temperature=0.5)
  want = 0.5 * (contrastive.nt_xent(x1, z2, temperature=0.5) + contrastive.nt_xent(x2, z1, temperature=0.5))
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert float(got) != pytest.approx(float(contrastive.nt_xent(x1, z1, temperature=0.5)))


def test_byol_regression_loss_by_hand_and_stop_gradient():
  p = jnp.array([[2.0, 0.0]])
  z = jnp.array([[0.6, 0.8]])
  assert float(byol.regression_loss(p, z)) == pytest.approx(2 - 2 * 0.6, rel=1e-6)
  assert float(jnp.abs(jax.grad(lambda t: byol.regression_loss(p, t))(z)).sum()) == 0.0


def test_byol_target_decay_schedule():
  assert float(byol.target_decay(0, 100, 0.996)) == pytest.approx(0.996)
  assert float(byol.target_decay(50, 100, 0.996)) == pytest.approx(0.998)
  assert float(byol.target_decay(100, 100, 0.996)) == pytest.approx(1.0)
  target, online = {"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}
  assert float(byol.ema(target, online, 0.75)["w"][0]) == pytest.approx(1.5)
