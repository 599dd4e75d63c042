"""A query photo that is in the gallery is cut into the gallery's own tiles.

For each archive builder (tiny archives in their real layout, tests/archive_fixtures.py):
the builder's tiling record, as export writes it into the manifest, applied by the
query path to the photo's file gives the same number of tiles at the same
coordinates as the dataset holds for that photo, with equal embeddings under a
tiny model (gallery rows through export's own embedding path).
"""

import numpy as np
import pytest
from etils import epath

from histojax import export, query, search
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from histojax.data import sources
from tests import archive_fixtures as fx
from tests.conftest import tiny_config
from tfds_builders.image_folder.image_folder_dataset_builder import ImageFolderConfig

INPUT = 32  # the model input: the archives' 32 px tiles, centre-cropped to themselves


def _image_folder_archive(root):
  """<root>/<class>/<image>.png, 64x96 with a 32 px glass band, as the other fixtures."""
  for c, name in enumerate(("stroma", "tumour")):
    for i in range(3):
      fx.save(root / name / f"{name}{i}.png", fx.tissue(64, 96, seed=10 * c + i, glass=32))


# dataset (or dataset/variant) -> (writes the archive into the manual_dir, builder config)
CASES = {
    "bach": (fx.bach_archive, fx.BACH_CONFIG),
    "bracs": (fx.bracs_archive, fx.BRACS_CONFIG),
    "crc": (fx.crc_archive, fx.CRC_CONFIG),
    "image_folder": (_image_folder_archive, ImageFolderConfig(name="t32", patch_size=32, tissue_threshold=0.1)),
    "image_folder/whole": (_image_folder_archive, "whole"),
}


@pytest.fixture(scope="module")
def tiny_model():
  config = tiny_config("")
  config.input.image_size = INPUT
  trainer, state = step_lib.create(config, mesh_lib.make_mesh(config.mesh))
  return lambda records: export.embed_source(trainer, state, records, INPUT, 8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_query_of_a_gallery_photo_reproduces_its_tiles(case, tmp_path, tiny_model):
  name = case.split("/")[0]
  write_archive, config = CASES[case]
  manual = tmp_path / "raw"
  write_archive(manual)
  data, builder = fx.build(name, config, manual, tmp_path / "data")
  listed = builder._sources(epath.Path(manual))  # noqa: SLF001  (which file each source id came from)
  whole = case.endswith("whole")
  checked = 0
  for photo in listed[:3]:
    record = export.builder_tiling(builder, photo.split)
    cfg = builder.builder_config
    assert record == {"patch_size": 0 if whole else 32, "stride": 0 if whole else 32, "resize": 1.0,
                      "tissue_threshold": None if whole else cfg.tissue_threshold,
                      "min_tissue_fraction": 0.0 if whole else cfg.min_tissue_fraction, "image_size": None,
                      "stain": None}
    split = data[photo.split]
    meta = sources.read_metadata(split)
    rows = np.flatnonzero(meta["source_id"] == photo.source_id)
    rows = rows[np.lexsort(meta["coords"][rows].T[::-1])]  # TFDS shuffles a split; the query path is row-major
    patches = query.cut(search.read_image(photo.path), query.tiling_record({"tiling": record}, INPUT), INPUT)
    # Same tiles: count and coordinates (row-major, as the builder writes them).
    assert len(rows) == len(patches.images) > 0, photo
    if not whole:
      assert [tuple(c) for c in meta["coords"][rows].tolist()] == patches.coords
      if name != "bracs":  # 64x96 photos with a 32 px glass band: 4 tissue tiles kept, 2 glass dropped
        assert (len(rows), patches.dropped) == (4, 2)
    gallery = tiny_model([split[int(r)] for r in rows])
    queried = tiny_model([{"image": image} for image in patches.images])
    np.testing.assert_allclose(queried, gallery, atol=1e-5)
    checked += 1
  assert checked == 3
