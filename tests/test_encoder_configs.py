"""configs/frozen_encoder.py and configs/finetune_encoder.py end to end, at reduced depth.

A random-weight hub folder in kaiko_vits16's published layout (full width, 2 blocks, the
parity fixtures' seeded routine) is converted with `convert --preset`; the frozen encoder
config then builds BACH's THUNDER split from a fixture archive in the real layout (whole
photos resized to 224x298), exports, indexes and scores it without training; `search`
and `serve` answer on its index, and `embed --tiling INDEX` of the gallery's own photo files gives
the gallery's rows. A 2-step fine-tune with the last block unfrozen moves that block and
the head, nothing else.
"""

import json
import pathlib
import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():  # Starlette 1.x would have httpx2 under its TestClient; httpx is the pinned one
  warnings.simplefilter("ignore", StarletteDeprecationWarning)
  from starlette.testclient import TestClient

from histojax import checkpoint, embed, models, optim, query, search, serve, train
from histojax import config as config_lib
from histojax.data import sources
from histojax.weights import store
from tests import archive_fixtures as afx
from tests.conftest import load_config

# The fixture photos are the same pink noise to a random-weight model: their features are collapsed,
# and every stage says so (health.CollapsedEmbeddingWarning), as it should.
pytestmark = pytest.mark.filterwarnings("ignore::histojax.health.CollapsedEmbeddingWarning")

PRESET = "kaiko_vits16"
# Photo numbers at the edges of THUNDER's ranges: every class has train, validation and test photos.
NUMBERS = (1, 10, 11, 16, 26, 42, 100)


@pytest.fixture(scope="module")
def weights(converted_preset) -> str:
  return converted_preset(PRESET)[0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  """(manual_dir, data_dir): the BACH fixture photos; the dataset is built by the first run."""
  root = tmp_path_factory.mktemp("bach")
  afx.bach_archive(root / "raw", numbers=NUMBERS)
  return str(root / "raw"), str(root / "data")


def _config(spec, weights, archive):
  config = load_config(spec, archive[1])
  config.dataset.manual_dir, config.dataset.prepare_if_missing = archive[0], True
  config.init_from = weights
  config.input.batch_size, config.input.m_per_class = 8, 2  # train's pipeline is built even for 0 steps
  return config


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, weights, archive):
  config = _config(f"configs/frozen_encoder.py:{PRESET},cpu", weights, archive)
  workdir = tmp_path_factory.mktemp("frozen")
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_frozen_encoder_exports_indexes_and_scores_without_training(frozen_run, archive):
  config, workdir, results = frozen_run
  test = sources.read_metadata(sources.open_split("bach/whole_224_thunder", "test", archive[1]))
  assert results["step"] == 0 and results["num_query"] == len(test["label"]) > 0
  for k in (1, 3, 5, 10):
    assert 0.0 <= results[f"thunder/balanced_accuracy@{k}"] <= 1.0 and f"thunder/macro_f1@{k}" in results
  assert results["health"]["gallery"]["dim"] == 384  # the published feature: the class token, no projection
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["layers"] == 2 and saved["model"]["embed_dim"] == 0  # the converted depth, taken over
  index = json.loads((workdir / "index" / "manifest.json").read_text())
  assert index["tiling"]["image_size"] == [224, 298] and index["image_size"] == 224
  assert (workdir / "eval" / "index.html").exists()


def test_search_answers_on_the_frozen_index(frozen_run, archive):
  _, workdir, _ = frozen_run
  photo = next(p for p in sorted((pathlib.Path(archive[0]) / "ICIAR2018_BACH_Challenge" / "Photos").rglob("*"))
               if p.suffix in (".tif", ".png"))
  answers = []
  assert search.run(str(workdir / "index"), [str(photo)], k=3, emit=answers.append) == 0
  (answer,) = answers
  assert answer["tiles_searched"] == 1 and answer["vote"] is not None and len(answer["tiles"][0]["results"]) == 3


def test_serve_answers_on_the_frozen_index(frozen_run, archive):
  _, workdir, _ = frozen_run
  index = str(workdir / "index")
  app = serve.build_app(query.QueryEngine.open(index), index, archive[1])
  photo = next((pathlib.Path(archive[0]) / "ICIAR2018_BACH_Challenge" / "Photos" / "Invasive").glob("*.png"))
  with TestClient(app) as client:
    found = client.post("/api/search?k=3", files={"image": (photo.name, photo.read_bytes(), "image/png")})
  assert found.status_code == 200, found.text
  assert found.json()["tiles_searched"] == 1 and len(found.json()["sources"]) == 3


def test_embed_with_the_index_tiling_reproduces_the_gallery_rows(frozen_run, weights, archive, tmp_path):
  """embed --tiling INDEX of the gallery's photo files: the gallery's cut, the same forward pass."""
  _, workdir, _ = frozen_run
  gallery = np.load(workdir / "export" / "train" / "embeddings.npy")
  meta = np.load(workdir / "export" / "train" / "metadata.npz")
  files = {p.stem: str(p) for p in (pathlib.Path(archive[0]) / "ICIAR2018_BACH_Challenge").rglob("*")
           if p.is_file() and p.suffix != ".csv"}
  paths = [files[str(s)] for s in meta["source_id"]]
  record = embed.run(weights, paths, str(tmp_path / "f.npy"), tiling=str(workdir / "index"), with_rows=True)
  features = np.load(tmp_path / "f.npy")
  assert record["count"] == len(paths) == len(gallery)
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  assert np.min(np.sum(unit * gallery, axis=1)) >= 0.99999
  rows = json.loads((tmp_path / "f.json").read_text())["rows"]
  assert [(r["y"], r["x"]) for r in rows] == [(0, 0)] * len(paths)  # whole photos: one tile each


def test_frozen_encoder_refuses_to_run_without_weights(archive, tmp_path):
  config = _config(f"configs/frozen_encoder.py:{PRESET}", "", archive)
  with pytest.raises(ValueError, match=r"--config.init_from=DIR"):
    train.train_and_evaluate(config, tmp_path / "w")
  config = _config(f"configs/finetune_encoder.py:{PRESET}", "", archive)
  with pytest.raises(ValueError, match=r"finetune.trunk='frozen' keeps the trunk's weights"):
    train.train_and_evaluate(config, tmp_path / "w")


def test_weights_of_another_preset_are_refused_naming_both(weights, archive):
  config = _config("configs/frozen_encoder.py:uni2_h", weights, archive)
  with pytest.raises(ValueError, match=r"holds 'kaiko_vits16' weights .* but model.name is 'uni2_h'"):
    config_lib.adopt_converted_architecture(config)


def test_finetune_with_the_last_block_unfrozen_moves_that_block_and_the_head(weights, archive, frozen_run, tmp_path):
  config = _config(f"configs/finetune_encoder.py:{PRESET},trunk=last_blocks,blocks=1,cpu", weights, archive)
  config.total_steps, config.optimizer.warmup_steps = 2, 0
  config.input.image_size = 112
  config.eval.at_end, config.eval.every_steps = False, 0
  train.train_and_evaluate(config, tmp_path / "ft")
  _, state, step = checkpoint.restore_for_eval(config, tmp_path / "ft")
  assert step == 2
  trained = {optim.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state[0])}
  imported, _ = store.load(weights)
  for name, value in imported.items():
    moved = float(np.abs(trained[name] - value).max())
    # Block 1 (the last of 2) and the final norm train; the patch embedding, tokens and block 0 do not.
    if name.startswith(("backbone.blocks.1.", "backbone.norm.")):
      assert moved > 1e-6, name
    else:
      assert moved == 0.0, (name, moved)
  fresh = nnx.state(models.build_model(config.model, config.seed))  # the head as step 0 initialised it
  head = np.asarray(fresh["head"]["proj"]["kernel"][...])
  assert head.shape == (384, 256) and float(np.abs(trained["head.proj.kernel"] - head).max()) > 1e-6
