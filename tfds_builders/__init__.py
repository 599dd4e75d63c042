"""histojax's TFDS builders. Importing this package registers every builder,
so `tfds.builder(name)` and `tfds.data_source(name)` find them by name."""
from tfds_builders import bach, bracs, crc, image_folder, kimia_path24, pair_query, slides, synthetic_tissue  # noqa: F401

# Dataset names this package provides, in the order docs/datasets.md lists them.
NAMES = ("synthetic_tissue", "bach", "bracs", "crc", "kimia_path24", "pair_query", "image_folder", "slides")
