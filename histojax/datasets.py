"""The project's datasets: importing this module registers every builder in
`tfds_builders` (bach, bracs, crc, kimia_path24, image_folder, pair_query,
synthetic_tissue) with TFDS, so `histojax.data.sources` finds them by name.

The entry points that read datasets by name (train, evaluate, prepare) import
it, and so do the tests; the data layer does not, so `histojax.data` and
`tfds_builders` do not depend on each other (the builders use the data layer,
not the reverse). The query path reads no dataset and does not import it.
"""

import tfds_builders  # noqa: F401  (registration is the import's effect)
