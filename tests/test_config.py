"""Configs: variants, typos, and the workdir round trip."""

import subprocess
import sys

import pytest

from configs import quickstart
from histojax import config as config_lib


def test_typo_in_config_code_names_the_field():
  config = config_lib.base_config()
  with pytest.raises(AttributeError, match="widht"):
    config.model.widht = 2


def test_typo_on_command_line_names_the_field(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "histojax.train", "--config", "configs/quickstart.py:tiny",
       "--config.model.widht=2", "--workdir", str(tmp_path)],
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'Did you mean "width"' in result.stderr
  assert not (tmp_path / "config.json").exists()  # failed before touching the workdir


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="tyni"):
    quickstart.get_config("tyni")


def test_validate_names_the_field():
  config = quickstart.get_config()
  config.input.m_per_class = 5
  with pytest.raises(ValueError, match=r"input.batch_size \(48\) must be a multiple of input.m_per_class \(5\)"):
    config_lib.validate(config)
  config = quickstart.get_config()
  config.model.name = "resnt"
  with pytest.raises(KeyError, match="unknown model 'resnt'; known: .*resnet"):
    config_lib.validate(config)


def test_save_load_roundtrip(tmp_path):
  config = quickstart.get_config("tiny")
  config.eval.ks = (1, 3)
  config_lib.save(config, tmp_path / "config.json")
  loaded = config_lib.load(tmp_path / "config.json")
  assert loaded.to_dict() == config.to_dict()
  assert loaded.is_locked


def test_cli_modules_import_together_and_define_flags_only_when_run():
  """Contract B: every CLI has module-level `main(argv)` and `define_flags()`, the latter
  called only under `__main__`, so the modules import each other without duplicate flags."""
  from absl import flags  # noqa: PLC0415

  from histojax import convert, embed, evaluate, prepare, search, train  # noqa: PLC0415
  for module in (convert, embed, evaluate, prepare, search, train):
    assert callable(module.main) and callable(module.define_flags), module.__name__
  assert not {"workdir", "index", "images", "dataset", "format", "step", "gallery", "weights", "tiling"} & set(flags.FLAGS)
