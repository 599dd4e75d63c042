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
