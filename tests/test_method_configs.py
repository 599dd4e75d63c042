"""Each method's config, shrunk to `tiny`, trains and evaluates end to end."""

import json

import numpy as np
import pytest

from histojax import train
from tests.conftest import load_config


@pytest.mark.parametrize("spec", ["configs/bach_dml.py:tiny", "configs/bach_dml.py:tiny,loss=abe",
                                  "configs/bach_cgd.py:tiny", "configs/bach_byol.py:tiny",
                                  "configs/bach_spq.py:tiny"])
def test_method_trains_and_evaluates(spec, tmp_path, tiny_data_dir):
  config = load_config(spec, tiny_data_dir)
  results = train.train_and_evaluate(config, tmp_path)
  assert results["step"] == config.total_steps
  assert 0.0 <= results["map@10"] <= 1.0
  logged = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(row["loss"]) for row in logged)
  saved = json.loads((tmp_path / "config.json").read_text())
  if config.objective.name == "cgd":
    assert saved["model"]["head"]["num_classes"] == 6  # -1 resolved from the dataset
  if config.objective.name == "byol":
    assert "probe_accuracy" in logged[-1]
  if config.objective.name == "spq":
    codes = np.load(tmp_path / "export" / "train" / "codes.npy")
    assert codes.shape == (48, config.objective.num_codebooks)
    assert results["index_mode"] == "adc"


def _pair_task_archive(root, per_class=8):
  """The pair task's layout, with painted stroma (class 0) and lymphocyte (class 2) patches."""
  from tfds_builders.synthetic_tissue import painter  # noqa: PLC0415
  import PIL.Image  # noqa: PLC0415

  names = {}
  for split, offset in (("train", 0), ("test", 100)):
    (root / split).mkdir(parents=True)
    for cls in (1, 2):
      for i in range(per_class):
        name = f"{split[:2]}{cls}{i:02d}"
        PIL.Image.fromarray(painter.paint_tissue(cls, offset + i, 64)).save(root / split / f"{name}.png")
        names.setdefault(split, []).append((name, cls))
  train, test = names["train"], names["test"]
  validation = [(a, b, int(ca == cb)) for (a, ca), (b, cb) in zip(train, train[3:] + train[:3])]
  (root / "validation_ground_truth.csv").write_text(
      "query,prediction\n" + "".join(f"{a}_{b},{same}\n" for a, b, same in validation))
  queries = [(a, b) for (a, _), (b, _) in zip(test, test[5:] + test[:5])]
  (root / "queries.csv").write_text("".join(f"{a}.png,{b}.png\n" for a, b in queries))
  return queries


def test_byol_pair_task_answers_every_query(tmp_path):
  from histojax.data import sources  # noqa: PLC0415

  queries = _pair_task_archive(tmp_path / "raw")
  sources.prepare("pair_query", str(tmp_path / "tfds"), str(tmp_path / "raw"))
  config = load_config("configs/pair_query_byol.py:tiny", str(tmp_path / "tfds"))
  results = train.train_and_evaluate(config, tmp_path / "work")
  rows = (tmp_path / "work" / "eval" / "pair_answers.csv").read_text().splitlines()
  assert rows[0] == "patch_a,patch_b,same"
  assert [tuple(r.split(",")[:2]) for r in rows[1:]] == queries
  assert {r.split(",")[2] for r in rows[1:]} <= {"0", "1"}
  assert results["pair_task_query_pairs"] == len(queries) == 16
  assert results["pair_task_validation_pairs"] == 16
  assert 0.0 <= results["pair_task_held_out_c_index"] <= 1.0
  assert "precision@1" not in results  # one unlabelled class: no label-based retrieval scores
