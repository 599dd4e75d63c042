"""Export: resumable after an interruption, atomic, reused, and the PQ-codes hook."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from histojax import export, identity, indexing, objectives, pq
from histojax import mesh as mesh_lib
from histojax import models
from histojax import step as step_lib
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def fresh(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  trainer, state = step_lib.create(config, mesh_lib.make_mesh(config.mesh))
  return config, trainer, state


class _Interrupted(Exception):
  pass


def _counting(monkeypatch, fail_on_call=None):
  """Wraps export.embed_source: counts calls, optionally dies on one, as a killed job would."""
  calls, real = [], export.embed_source

  def embed_source(*args, **kwargs):
    calls.append(len(args[2]))
    if fail_on_call is not None and len(calls) == fail_on_call:
      raise _Interrupted()
    return real(*args, **kwargs)
  monkeypatch.setattr(export, "embed_source", embed_source)
  return calls


def test_interrupted_export_resumes_at_the_first_missing_chunk(tmp_path, fresh, monkeypatch):
  config, trainer, state = fresh
  target = tmp_path / "export" / "train"
  # Tiny train split: 48 patches; eval batch 32 -> chunks [0, 32) and [32, 48).
  assert export.chunk_ranges(48, 32, 32) == [(0, 32), (32, 48)]
  calls = _counting(monkeypatch, fail_on_call=2)
  with pytest.raises(_Interrupted):
    export.export_split(trainer, state, config, "train", target, step=0, chunk_examples=32)
  assert not target.exists()  # nothing half-written where readers look
  assert (tmp_path / "export" / ".train.partial" / "chunks" / "0000000000-0000000032.npy").exists()

  calls = _counting(monkeypatch)
  resumed = export.export_split(trainer, state, config, "train", target, step=0, chunk_examples=32)
  assert calls == [16]  # only the second chunk was embedded again
  assert not (tmp_path / "export" / ".train.partial").exists()

  straight = export.export_split(trainer, state, config, "train", tmp_path / "straight", step=0, chunk_examples=32)
  np.testing.assert_array_equal(resumed.embeddings, straight.embeddings)
  np.testing.assert_allclose(np.linalg.norm(resumed.embeddings, axis=1), 1.0, rtol=1e-5)
  m = resumed.manifest
  assert m["count"] == 48 and m["dim"] == 32 and m["split"] == "train" and len(m["fingerprint"]) == 16
  assert m["class_names"][0] == "adipose" and m["tiling"]["patch_size"] == 64 and m["pq"] is None

  calls = _counting(monkeypatch)
  again = export.export_split(trainer, state, config, "train", target, step=0, chunk_examples=32)
  assert calls == [] and np.array_equal(again.embeddings, resumed.embeddings)  # reused as is
  loaded = export.load(target)
  np.testing.assert_array_equal(loaded.label, resumed.label)
  assert loaded.source_id[0] == resumed.source_id[0]


def test_chunks_of_another_checkpoint_are_not_reused(tmp_path, fresh, monkeypatch):
  config, trainer, state = fresh
  target = tmp_path / "train"
  _counting(monkeypatch, fail_on_call=2)
  with pytest.raises(_Interrupted):
    export.export_split(trainer, state, config, "train", target, 0, fingerprint_="aaaa", chunk_examples=32)
  calls = _counting(monkeypatch)
  out = export.export_split(trainer, state, config, "train", target, 0, fingerprint_="bbbb", chunk_examples=32)
  assert calls == [32, 16] and out.manifest["fingerprint"] == "bbbb"


def test_fingerprint_follows_the_weights(fresh):
  config, trainer, state = fresh
  same = identity.fingerprint(trainer, state)
  assert same == identity.fingerprint(trainer, state)
  shifted = jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 and x.ndim == 4 else x, state)
  assert identity.fingerprint(trainer, shifted) != same


class _Quantised(nnx.Module):
  """An embedder with PQ codebooks, the shape SPQ's model has."""

  def __init__(self, inner, codebooks):
    self.inner = inner
    self.codebooks = nnx.Param(codebooks)

  def __call__(self, images):
    return self.inner(images)


def _quantising_objective(config):
  """The run's objective, with SPQ's PQ hook pointed at `_Quantised.codebooks`."""
  objective = objectives.build(config)
  objective.codebooks = lambda model: (np.asarray(model.codebooks[...]), "dot_product")
  return objective


def test_a_model_with_codebooks_exports_pq_codes_searched_by_adc(tmp_path, tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  mesh = mesh_lib.make_mesh(config.mesh)
  books = np.random.default_rng(0).standard_normal((4, 16, 8)).astype(np.float32)  # 4 books x 16 words, 32 dims
  model = _Quantised(models.build_model(config.model), books)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)))
  trainer = step_lib.Trainer(graphdef, _quantising_objective(config), None, mesh)
  state = jax.device_put(state, mesh_lib.replicated(mesh))

  out = export.export_split(trainer, state, config, "train", tmp_path / "train", step=0)
  assert out.codes.shape == (48, 4) and out.codes.dtype == np.uint8
  np.testing.assert_array_equal(out.codes, pq.encode(out.embeddings, books))
  assert out.manifest["pq"] == {"num_books": 4, "num_codewords": 16, "metric": "dot_product", "bits_per_row": 16.0}
  loaded = export.load(tmp_path / "train")
  np.testing.assert_array_equal(loaded.codes, out.codes)

  idx = indexing.build(None, config.eval.index, codes=loaded.codes, codebooks=loaded.codebooks)
  assert idx.mode == "adc"
  found, scores = indexing.search(idx, loaded.embeddings[:5], 3)
  exact, _ = indexing.exact_search(pq.reconstruct(loaded.codes, books), loaded.embeddings[:5], 3)
  np.testing.assert_array_equal(found, exact)
