"""image_folder: your own images in `root/<class>/<image>`, tiled or whole.

Class names are the folder names, sorted. With split folders
(`root/{train,validation,test}/<class>/<image>`; `val`, `valid`, `training`,
`testing` are read too) the splits are kept; without them, images are split
deterministically, stratified by class, with the config's fractions. Every
tile of an image stays in that image's split.

One data_dir holds one image_folder dataset: build each tree into its own
`--data_dir`.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds
from etils import epath

from tfds_builders import common

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
                 "validation": "validation", "test": "test", "testing": "test"}


@dataclasses.dataclass
class ImageFolderConfig(common.SplitConfig):
  split_fractions: tuple[tuple[str, float], ...] = (("train", 0.8), ("test", 0.2))


class Builder(common.TiledBuilder):
  """A user's own class-per-folder image tree."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES = None  # read from the folders
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass your image tree as manual_dir, one folder per class, optionally under split folders:
    <manual_dir>/<class>/<image>.{tif,tiff,jpg,jpeg,png}
    <manual_dir>/{train,validation,test}/<class>/<image>...
  """
  BUILDER_CONFIGS = [
      ImageFolderConfig(name="default", description="224 px tiles, Otsu tissue filter; 80/20 split per image "
                        "unless split folders exist."),
      ImageFolderConfig(name="whole", description="Images kept whole (patch datasets); 80/20 split per image "
                        "unless split folders exist.", patch_size=0),
  ]

  def _sources(self, manual_dir: epath.Path) -> list[common.SourceImage]:
    folders = common.subfolders(manual_dir)
    if not folders:
      raise self.layout_error(f"no class folders in {manual_dir}.")
    split_named = [f for f in folders if f.name.lower() in SPLIT_FOLDERS]
    if split_named and len(split_named) != len(folders):
      others = [f.name for f in folders if f not in split_named]
      raise self.layout_error(f"{manual_dir} mixes split folders {[f.name for f in split_named]} with "
                              f"class folders {others}.")
    trees = [(f, SPLIT_FOLDERS[f.name.lower()]) for f in split_named] or [(manual_dir, "")]
    names = sorted({c.name for tree, _ in trees for c in common.subfolders(tree)})
    if not names:
      raise self.layout_error(f"no class folders under {[str(t) for t, _ in trees]}.")
    self.info.features["label"].names = names
    sources = []
    for tree, split in trees:
      prefix = f"{tree.name}/" if split else ""
      for class_dir in common.subfolders(tree):
        sources += [common.SourceImage(str(p), names.index(class_dir.name), f"{prefix}{class_dir.name}/{p.stem}",
                                       split, tree.name if split else "")
                    for p in common.list_images(class_dir)]
    if trees[0][1]:
      return sources
    cfg = self.builder_config
    splits = common.stratified_split({s.source_id: s.label for s in sources}, cfg.split_fractions, cfg.split_seed)
    return [dataclasses.replace(s, split=splits[s.source_id]) for s in sources]
