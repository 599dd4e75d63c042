"""The pair query task on hand-made embeddings and pairs."""

import numpy as np
import pytest

from histojax import pairs

# Patches of two classes on two axes; "x" names are class 0, "y" names class 1.
IDS = np.array(["x1", "x2", "x3", "y1", "y2", "y3"])
EMB = np.array([[1, 0.1], [1, 0.2], [1, -0.1], [0.1, 1], [-0.2, 1], [0.3, 1]], np.float32)


def test_similarities_by_id():
  sim = pairs.similarities(EMB, IDS, [["x1", "x2"], ["x1", "y1"]])
  e = EMB / np.linalg.norm(EMB, axis=1, keepdims=True)
  np.testing.assert_allclose(sim, [e[0] @ e[1], e[0] @ e[3]], rtol=1e-6)
  with pytest.raises(KeyError, match="z9"):
    pairs.similarities(EMB, IDS, [["x1", "z9"]])


def test_answer_decides_queries_with_the_validation_threshold():
  validation = [["x1", "x2", 1], ["y1", "y2", 1], ["x1", "y1", 0], ["x2", "y3", 0], ["x3", "y2", 0], ["y1", "y3", 1]]
  query = [["x3", "x1"], ["y2", "x2"], ["y3", "y2"]]
  results, decisions = pairs.answer(EMB, IDS, EMB, IDS, {"validation": validation, "query": query})
  assert decisions == [("x3", "x1", 1), ("y2", "x2", 0), ("y3", "y2", 1)]
  assert results["pair_task_validation_c_index"] == 1.0
  assert 0.0 <= results["pair_task_held_out_c_index"] <= 1.0  # six pairs: a half may hold one kind only
  assert results["pair_task_query_pairs"] == 3 and results["pair_task_query_same_fraction"] == pytest.approx(2 / 3)


def test_held_out_estimate_on_separable_pairs():
  rng = np.random.default_rng(1)
  same = rng.random(200) < 0.5
  sim = np.where(same, rng.uniform(0.6, 1.0, 200), rng.uniform(-0.2, 0.4, 200))
  assert pairs.held_out_c_index(sim, same) == 1.0


def test_held_out_estimate_is_not_the_in_sample_score():
  # Random similarities: the in-sample threshold overfits, the held-out score does not.
  rng = np.random.default_rng(0)
  sim, same = rng.normal(size=400), rng.random(400) < 0.5
  held = pairs.held_out_c_index(sim, same)
  assert 0.4 < held < 0.6


def test_answer_needs_validation_pairs():
  with pytest.raises(ValueError, match="validation pairs"):
    pairs.answer(EMB, IDS, EMB, IDS, {"query": [["x1", "x2"]]})
