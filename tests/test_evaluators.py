"""Evaluation during training: known scores by hand, fixed rows, and the config's checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from histojax import config as config_lib
from histojax import evaluators
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from tests.conftest import tiny_config

# Unit vectors at these angles (degrees): the rankings below follow from the angles alone.
# Gallery: (angle, label, source image).
GALLERY = [(0, 0, "a"), (10, 0, "b"), (20, 1, "c"), (80, 1, "d"), (90, 1, "e")]
# Queries: q0 comes from image "a", whose gallery tile is its nearest row and must be left out.
QUERIES = [(1, 0, "a"), (84, 1, "q"), (16, 0, "r")]
# Top 3 after excluding image "a": q0 -> labels [0, 1, 1]; q1 -> [1, 1, 1]; q2 -> [1, 0, 0].
EXPECTED = {"precision@1": 2 / 3, "precision@3": (1 / 3 + 1 + 2 / 3) / 3,
            "map@1": 2 / 3, "map@3": (1 + 1 + (1 / 2 + 2 / 3) / 2) / 3,
            "majority_vote@1": 2 / 3, "majority_vote@3": 2 / 3}


def _vectors(angles):
  rad = np.deg2rad(np.asarray(angles, np.float64))
  return np.stack([np.cos(rad), np.sin(rad)], 1).astype(np.float32)


def _columns(rows):
  angles, labels, ids = zip(*rows)
  return _vectors(angles), np.asarray(labels), np.asarray(ids)


def test_score_by_hand_with_own_source_left_out():
  g_emb, g_lab, g_src = _columns(GALLERY)
  q_emb, q_lab, q_src = _columns(QUERIES)
  got = evaluators.score(3 * g_emb, g_lab, q_emb, q_lab, (1, 3), (g_src, q_src))  # scale: cosine, not dot
  assert got == pytest.approx(EXPECTED, abs=1e-9)
  # Without the exclusion q0 finds its own image first: [0, 0, 1] -> precision@3 and the vote rise.
  kept = evaluators.score(g_emb, g_lab, q_emb, q_lab, (1, 3))
  assert kept["precision@3"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
  assert kept["majority_vote@3"] == pytest.approx(1.0)


class _Records:
  """A random-access source of decoded records, as TFDS gives (arrays pass the decoder)."""

  def __init__(self, rows, size=6):
    self.records = [{"image": np.full((size, size, 3), angle, np.uint8), "label": np.int64(label),
                     "source_id": source.encode(), "coords": np.zeros(2, np.int32)}
                    for angle, label, source in rows]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]

  def __getitems__(self, indices):
    return [self.records[i] for i in indices]


def test_evaluator_embeds_the_chosen_rows_over_the_mesh(devices):
  """The whole path (pick rows, decode, pad, embed over 8 devices, gather, search, score) with an
  embedding read off the pixels, so the scores are `EXPECTED`. Rows not chosen are decoys that
  would change them; the gallery spans two padded global batches."""
  decoy = (1, 1, "z")  # nearest to q0 with the wrong label
  far = [(200, 0, f"x{i}") for i in range(4)]  # never in anyone's top 3
  gallery_rows = [decoy, GALLERY[0], decoy, *GALLERY[1:], decoy, *far]
  chosen = [i for i, row in enumerate(gallery_rows) if row != decoy]
  query_rows = [decoy, *QUERIES]
  mesh = mesh_lib.make_mesh(tiny_config("").mesh)
  gallery = evaluators.load_subsample(_Records(gallery_rows), "train", np.asarray(chosen), 4, 8)
  query = evaluators.load_subsample(_Records(query_rows), "test", np.asarray([1, 2, 3]), 4, 8)
  assert len(gallery.rows) == 9 and gallery.images.shape == (16, 4, 4, 3)  # two global batches of 8

  @jax.jit
  def embed_fn(images):
    rad = jnp.deg2rad(images[:, 0, 0, 0].astype(jnp.float32))
    return jnp.stack([jnp.cos(rad), jnp.sin(rad)], 1)

  keys = evaluators.exclusion_keys(gallery, query, exclude_same_source=True)
  got = evaluators.RetrievalEvaluator(gallery, query, (1, 3), keys, mesh, 8, setup_seconds=0.5).run(embed_fn)
  assert {k: v for k, v in got.items() if "seconds" not in k} == pytest.approx(
      {f"during/{k}": v for k, v in EXPECTED.items()}, abs=1e-6)
  assert got["during/seconds"] > 0 and got["during/setup_seconds"] == 0.5


def _sub(split, rows, ids):
  return evaluators.Subsample(split, np.asarray(rows), np.zeros(len(rows)), np.asarray(ids),
                              np.zeros((0, 1, 1, 3), np.uint8))


def test_exclusion_keys_follow_the_final_evaluation():
  gallery, query = _sub("train", [0, 4, 7], ["a", "b", "c"]), _sub("train", [4, 5], ["b", "d"])
  assert [k.tolist() for k in evaluators.exclusion_keys(gallery, query, True)] == [["a", "b", "c"], ["b", "d"]]
  assert [k.tolist() for k in evaluators.exclusion_keys(gallery, query, False)] == [[0, 4, 7], [4, 5]]
  assert evaluators.exclusion_keys(gallery, _sub("test", [4], ["q"]), False) is None


def _due(every, total, skip_last):
  return [s for s in range(0, total + 1) if evaluators.is_due(s, every, total, skip_last)]


def test_due_steps():
  assert _due(2, 6, skip_last=True) == [2, 4]  # the full evaluation scores step 6
  assert _due(2, 6, skip_last=False) == [2, 4, 6]
  assert _due(4, 6, skip_last=True) == [4]
  assert _due(0, 6, skip_last=False) == []


def test_rows_are_drawn_once_from_the_seed(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  config.eval.every_steps = 2
  config.eval.during.gallery_rows, config.eval.during.query_rows = 20, 10
  trainer, _ = step_lib.abstract_trainer(config, mesh_lib.make_mesh(config.mesh))
  first, again = (evaluators.from_config(config, trainer).evaluator for _ in range(2))
  for a, b in ((first.gallery, again.gallery), (first.query, again.query)):
    assert len(a.rows) == len(set(a.rows.tolist()))
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.images, b.images)
  assert (len(first.gallery.rows), len(first.query.rows)) == (20, 10)
  assert (first.gallery.split, first.query.split) == ("train", "test")
  config.seed = 1
  other = evaluators.from_config(config, trainer).evaluator
  assert not np.array_equal(other.gallery.rows, first.gallery.rows)
  config.eval.every_steps = 0
  assert evaluators.from_config(config, trainer) is None


def test_last_step_is_left_to_the_full_evaluation_of_the_same_queries(tiny_data_dir):
  config = tiny_config(tiny_data_dir)  # 4 steps, evaluation at the end on the test split
  config.eval.every_steps = 2
  trainer, _ = step_lib.abstract_trainer(config, mesh_lib.make_mesh(config.mesh))
  assert [s for s in range(5) if evaluators.from_config(config, trainer).due(s)] == [2]
  config.eval.during.query_split = "train"  # queries the final evaluation does not score
  assert [s for s in range(5) if evaluators.from_config(config, trainer).due(s)] == [2, 4]
  config.eval.during.query_split, config.eval.at_end = "", False
  assert [s for s in range(5) if evaluators.from_config(config, trainer).due(s)] == [2, 4]


def test_choose_rows():
  rows = evaluators.choose_rows(1000, 100, seed=0, role=evaluators.GALLERY)
  assert len(set(rows.tolist())) == 100 and np.all(np.diff(rows) > 0) and rows.max() < 1000
  np.testing.assert_array_equal(rows, evaluators.choose_rows(1000, 100, 0, evaluators.GALLERY))
  assert not np.array_equal(rows, evaluators.choose_rows(1000, 100, 0, evaluators.QUERY))
  np.testing.assert_array_equal(evaluators.choose_rows(7, 100, 0, evaluators.QUERY), np.arange(7))


@pytest.mark.parametrize("field, value, message", [
    ("every_steps", -1, "eval.every_steps must be 0 .off. or a positive number of steps, got -1"),
    ("during.gallery_rows", 0, "eval.during.gallery_rows must be at least 1, got 0"),
    ("during.query_rows", -5, "eval.during.query_rows must be at least 1, got -5"),
])
def test_validate_names_the_field(field, value, message):
  config = tiny_config("")
  node, *path = config.eval, *field.split(".")
  for name in path[:-1]:
    node = node[name]
  node[path[-1]] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_a_missing_query_split_names_the_field(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  config.eval.every_steps = 2
  config.eval.during.query_split = "validation"  # synthetic_tissue has train and test only
  trainer, _ = step_lib.abstract_trainer(config, mesh_lib.make_mesh(config.mesh))
  with pytest.raises(ValueError, match=r"eval.during.query_split='validation': .*has no split 'validation'"):
    evaluators.from_config(config, trainer)


def test_an_unlabelled_dataset_is_refused(tiny_data_dir, monkeypatch):
  """pair_query's patches carry one class: P@k would be 1 whatever the model does."""
  config = tiny_config(tiny_data_dir)
  config.eval.every_steps = 2
  trainer, _ = step_lib.abstract_trainer(config, mesh_lib.make_mesh(config.mesh))
  monkeypatch.setattr(evaluators.sources, "class_names", lambda name, data_dir="": ["patch"])
  with pytest.raises(ValueError, match="eval.every_steps=2: 'synthetic_tissue/tiny' has one class"):
    evaluators.from_config(config, trainer)
