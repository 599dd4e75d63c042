"""The project's datasets: importing this module registers every builder in
`tfds_builders` (bach, bracs, crc, kimia_path24, image_folder, pair_query,
synthetic_tissue) with TFDS, so `histojax.data.sources` finds them by name.

The entry points (train, evaluate, prepare, search, the query engine) import
it; the data layer does not, so `histojax.data` and `tfds_builders` do not
depend on each other (the builders use the data layer, not the reverse).
"""

import tfds_builders  # noqa: F401  (registration is the import's effect)
