"""Pair query: threshold selection and c-index on hand-made pairs."""

import numpy as np
import pytest

from histojax import pairs


def test_threshold_separates_a_clean_set():
  d = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
  same = np.array([True, True, True, False, False])
  t = pairs.choose_threshold(d, same)
  assert t == pytest.approx(0.5)
  assert pairs.c_index(pairs.decide(d, t), same) == 1.0


def test_threshold_with_an_overlap_and_a_tie():
  # Sorted: .1 S, .2 D, .3 S, .4 D. Thresholds: <.1 -> 2 right (both D), .15 -> 3, .25 -> 2, .35 -> 3, >.4 -> 2.
  d = np.array([0.3, 0.1, 0.4, 0.2])
  same = np.array([True, True, False, False])
  t = pairs.choose_threshold(d, same)
  assert t == pytest.approx(0.15)  # ties go to the smaller threshold
  assert pairs.c_index(pairs.decide(d, t), same) == pytest.approx(0.75)


def test_pair_distances():
  emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
  np.testing.assert_allclose(pairs.pair_distances(emb, np.array([[0, 1], [0, 2]])), [1.0, 0.0], atol=1e-7)


def test_empty_or_mismatched_input_is_refused():
  with pytest.raises(ValueError):
    pairs.choose_threshold(np.array([]), np.array([], bool))
  with pytest.raises(ValueError):
    pairs.c_index(np.array([True]), np.array([True, False]))
