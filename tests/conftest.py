"""Test set-up: 8 fake CPU devices, so sharded code runs over a real mesh.

XLA reads the flag once, when JAX first initialises its backend, so it is set
here before any test module imports jax.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from histojax import convert, datasets  # noqa: E402, F401  (datasets: registers the builders, as the entry points do)
from histojax.data import sources  # noqa: E402
from histojax.models import presets  # noqa: E402
from tests import encoder_fixtures  # noqa: E402

# The real BACH photos (the official layout), when the machine has them: the location comes
# from the environment, never from where this checkout happens to sit. `.ci/run` sets it.
BACH = pathlib.Path(os.environ["HISTOJAX_BACH_DIR"]) if os.environ.get("HISTOJAX_BACH_DIR") else None
if BACH is not None and not (BACH / "ICIAR2018_BACH_Challenge" / "Photos").is_dir():
  raise RuntimeError(f"HISTOJAX_BACH_DIR={BACH} does not hold ICIAR2018_BACH_Challenge/Photos")
NO_BACH = "real BACH photos not given: set HISTOJAX_BACH_DIR to the BACH folder (CI does)"


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
  """TFDS data_dir holding the prepared `synthetic_tissue/tiny` dataset."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.prepare("synthetic_tissue/tiny", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def converted_preset(tmp_path_factory):
  """name -> (weights folder, manifest): the preset's random published-layout weights
  (tests/encoder_fixtures.py, full width, 2 blocks) written as a hub folder and converted by
  the real `convert --preset` path, once per session whichever module asks first."""
  cache = {}

  def get(name):
    if name not in cache:
      preset, root = presets.get(name), tmp_path_factory.mktemp(name)
      encoder_fixtures.write_hub_folder(preset, str(root / "hub"))
      manifest = convert.convert(preset.format, str(root / "hub"), str(root / "weights"), preset=name)
      cache[name] = (str(root / "weights"), manifest)
    return cache[name]
  return get


@pytest.fixture(scope="session")
def devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS)"
  return jax.devices()


def tiny_config(data_dir: str):
  """The quickstart's `tiny` variant, reading the test data_dir."""
  from configs import quickstart  # noqa: PLC0415
  config = quickstart.get_config("tiny")
  config.dataset.data_dir = data_dir
  config.dataset.prepare_if_missing = False
  return config


def load_config(spec: str, data_dir: str):
  """`configs/x.py:variant` loaded as `--config` would, reading the test data_dir."""
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415

  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("config_under_test", pathlib.Path(__file__).parents[1] / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  config.dataset.data_dir = data_dir
  config.dataset.prepare_if_missing = False
  return config
