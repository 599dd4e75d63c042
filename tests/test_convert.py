"""`python -m histojax.convert` and `config.init_from`: the published-weights path end to end."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from histojax import checkpoint, convert, evaluate, models, train, weights
from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from histojax.weights import store
from tests import published_keys as published
from tests.conftest import tiny_config
from tests.test_weights import fixture


def test_cli_writes_weights_and_refuses_to_overwrite(tmp_path):
  out = tmp_path / "uni_tiny"
  cmd = [sys.executable, "-m", "histojax.convert", "--format", "timm_vit",
         "--input", fixture("timm_vit_tiny.safetensors"), "--output", str(out)]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "34 variables" in result.stdout and "--config.init_from=" in result.stdout
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["format"] == "timm_vit" and manifest["model"]["layer_scale"] > 0
  assert manifest["ignored"] == {"head.bias": "classifier (heads are trained, not imported)",
                                 "head.weight": "classifier (heads are trained, not imported)"}
  assert manifest["sources"]["backbone.blocks.0.attn.qkv.kernel"] == "blocks.0.attn.qkv.weight"
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "already holds weights" in again.stderr


def _tiny_resnet_weights(tmp_path, config):
  """Published-layout weights for the quickstart's tiny ResNet-18, converted."""
  base = int(64 * config.model.width)
  rng = np.random.default_rng(0)
  tensors = {k: rng.standard_normal(s).astype(np.float32) if s else np.asarray(1, np.int64)
             for k, s in published.torchvision_resnet(18, base=base, classes=10).items()}
  tensors.update({k: np.abs(v) + 0.5 for k, v in tensors.items() if k.endswith("running_var")})
  save_file(tensors, str(tmp_path / "r18.safetensors"))
  convert.convert("torchvision_resnet", str(tmp_path / "r18.safetensors"), str(tmp_path / "r18"))
  return tmp_path / "r18", tensors


def _final_model_params(config, workdir):
  mngr = checkpoint.manager(workdir, config.checkpoint)
  _, like = step_lib.create(config, mesh_lib.make_mesh(config.mesh))
  state, _ = checkpoint.restore(mngr, mngr.latest_step(), like)
  mngr.close()
  return jax.tree.map(np.asarray, state[0])


def test_training_starts_from_init_from_then_resumes_from_its_checkpoint(tmp_path, tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  weights_dir, tensors = _tiny_resnet_weights(tmp_path, config)
  config.init_from = str(weights_dir)
  config.total_steps, config.eval.at_end = 1, False
  config.optimizer.name, config.optimizer.lr = "sgd", 0.0  # a step that keeps the parameters
  train.train_and_evaluate(config, tmp_path / "work")
  params = _final_model_params(config, tmp_path / "work")
  np.testing.assert_array_equal(params["backbone"]["layer3"][1]["conv2"]["kernel"],
                                tensors["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["backbone"]["bn1"]["scale"], tensors["bn1.weight"])

  # With a checkpoint in the workdir, init_from is not read at all (it no longer exists).
  config.init_from = str(tmp_path / "gone")
  assert train.train_and_evaluate(config, tmp_path / "work") == {}  # finished, evaluation off


def test_zero_steps_evaluates_the_imported_weights(tmp_path, tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  config.init_from = str(_tiny_resnet_weights(tmp_path, config)[0])
  config.total_steps = 0
  results = train.train_and_evaluate(config, tmp_path / "work")
  assert results["step"] == 0 and 0.0 <= results["precision@5"] <= 1.0
  # The evaluate CLI's path (restore the workdir's checkpoint) sees the same model.
  shutil.rmtree(tmp_path / "work" / "export")  # recomputed from the restored state
  assert evaluate.evaluate(config, tmp_path / "work") == results


def test_init_from_that_does_not_fit_lists_the_keys(tmp_path, tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  weights_dir, _ = _tiny_resnet_weights(tmp_path, config)
  config.model.width = 0.25  # twice as wide as the converted weights
  state = nnx.state(models.abstract_model(config.model))  # the check precedes any array work
  with pytest.raises(weights.WeightMismatchError, match=r"mis-shaped(.|\n)*backbone.conv1.kernel saved \(7, 7, 3, 8\)"):
    store.apply(state, weights_dir)
  with pytest.raises(FileNotFoundError, match="python -m histojax.convert"):
    store.apply(state, tmp_path)
  config.total_steps, config.init_from = 0, ""
  with pytest.raises(ValueError, match="or 0 with init_from"):
    config_lib.validate(config)
