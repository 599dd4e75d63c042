"""synthetic_tissue: a small, deterministic H&E-like smoke dataset.

Nothing is downloaded: every source image is painted from a seed (see
`painter.py`) and cut into non-overlapping tiles. Splits are made per source
image, so no two splits share patches of one image, exactly as real datasets
must be split. Use it to check that training, export, indexing and scoring
run; its accuracy figures say nothing about real tissue.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from tfds_builders.synthetic_tissue import painter


@dataclasses.dataclass
class SyntheticTissueConfig(tfds.core.BuilderConfig):
  sources_per_class: int = 12
  test_sources_per_class: int = 4
  image_size: int = 256
  tile_size: int = 64


class Builder(tfds.core.GeneratorBasedBuilder):
  """Painted H&E-like tissue tiles, six classes, split per source image."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticTissueConfig(name="default", description="6 classes x 12 images of 256 px, 64 px tiles."),
      SyntheticTissueConfig(
          name="tiny", description="6 classes x 4 images of 128 px, 64 px tiles (tests).",
          sources_per_class=4, test_sources_per_class=2, image_size=128),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    t = self.builder_config.tile_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(t, t, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=painter.CLASS_NAMES),
            "source_id": tfds.features.Text(),
            "coords": tfds.features.Tensor(shape=(2,), dtype=np.int32),  # (y, x) of the tile
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/histojax/histojax",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    if not 0 < cfg.test_sources_per_class < cfg.sources_per_class:
      raise ValueError(
          f"synthetic_tissue/{cfg.name}: test_sources_per_class ({cfg.test_sources_per_class}) must be "
          f"between 1 and sources_per_class - 1 ({cfg.sources_per_class - 1})")
    n_train = cfg.sources_per_class - cfg.test_sources_per_class
    return {
        "train": self._generate_examples(range(n_train)),
        "test": self._generate_examples(range(n_train, cfg.sources_per_class)),
    }

  def _generate_examples(self, seeds):
    cfg = self.builder_config
    for label, name in enumerate(painter.CLASS_NAMES):
      for seed in seeds:
        image = painter.paint_tissue(label, seed, cfg.image_size)
        source_id = f"{name}_{seed:03d}"
        for y in range(0, cfg.image_size - cfg.tile_size + 1, cfg.tile_size):
          for x in range(0, cfg.image_size - cfg.tile_size + 1, cfg.tile_size):
            tile = image[y:y + cfg.tile_size, x:x + cfg.tile_size]
            yield f"{source_id}_{y}_{x}", {
                "image": _png_bytes(tile),
                "label": label,
                "source_id": source_id,
                "coords": np.array([y, x], np.int32),
            }


def _png_bytes(array: np.ndarray) -> bytes:
  # Encoded bytes, not arrays: TFDS encodes numpy images with TensorFlow, which
  # we do not install (it conflicts with scann).
  buf = io.BytesIO()
  PIL.Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()
