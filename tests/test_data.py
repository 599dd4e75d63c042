"""Builder, samplers and Grain pipelines."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from histojax.data import augment, pipeline, samplers, sources
from tests.conftest import tiny_config


def test_synthetic_builder_reads_back_through_data_source(tiny_data_dir):
  ds = tfds.data_source("synthetic_tissue/tiny", data_dir=tiny_data_dir)
  assert {k: len(v) for k, v in ds.items()} == {"train": 48, "test": 48}
  example = ds["train"][0]
  assert example["image"].shape == (64, 64, 3) and example["image"].dtype == np.uint8
  meta = {split: sources.read_metadata(sources.open_split("synthetic_tissue/tiny", split, tiny_data_dir))
          for split in ("train", "test")}
  for m in meta.values():
    assert np.bincount(m["label"]).tolist() == [8] * 6
  # Splits are made per source image: no image contributes patches to both.
  assert not set(meta["train"]["source_id"]) & set(meta["test"]["source_id"])
  assert len(set(meta["train"]["source_id"])) == 12  # 6 classes x 2 images, 4 tiles each


def test_synthetic_images_are_deterministic(tiny_data_dir, tmp_path):
  again = sources.prepare("synthetic_tissue/tiny", str(tmp_path))
  a = tfds.data_source("synthetic_tissue/tiny", data_dir=tiny_data_dir)["test"]
  b = tfds.data_source("synthetic_tissue/tiny", data_dir=str(tmp_path))["test"]
  np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
  assert again["splits"]["test"]["per_class"]["gland"] == 8


def test_m_per_class_batches():
  labels = np.repeat(np.arange(5), [10, 7, 3, 12, 8])  # uneven, one class smaller than m
  order = samplers.MPerClassOrder(labels, global_batch=12, m=4, seed=0)
  for b in range(10):  # several epochs
    batch = labels[[order[b * 12 + i] for i in range(12)]]
    chunks = batch.reshape(3, 4)
    assert (chunks == chunks[:, :1]).all()  # m consecutive rows share a class
    assert len(set(chunks[:, 0])) == 3  # 3 distinct classes per batch


def test_m_per_class_uses_whole_class_before_repeating():
  labels = np.repeat(np.arange(2), 8)
  order = samplers.MPerClassOrder(labels, global_batch=8, m=4, seed=1)
  first_epoch = [order[i] for i in range(16)]
  assert sorted(first_epoch) == list(range(16))


def test_process_shards_tile_the_global_batch():
  labels = np.repeat(np.arange(6), 10)
  one = samplers.MPerClassOrder(labels, 24, 4, seed=3)
  parts = [samplers.MPerClassOrder(labels, 24, 4, seed=3, process_index=p, process_count=3) for p in range(3)]
  for b in range(4):
    global_rows = [one[b * 24 + i] for i in range(24)]
    local_rows = sum(([parts[p][b * 8 + i] for i in range(8)] for p in range(3)), [])
    assert global_rows == local_rows


def test_sampler_errors_name_the_problem():
  labels = np.repeat(np.arange(2), 10)
  with pytest.raises(ValueError, match="needs 3 classes per batch, but the split has only 2"):
    samplers.MPerClassOrder(labels, 12, 4, seed=0)
  with pytest.raises(ValueError, match="larger than the split"):
    samplers.ShuffledOrder(5, 8, seed=0)


def test_shuffled_order_is_a_permutation_per_epoch():
  order = samplers.ShuffledOrder(20, 4, seed=0)
  assert sorted(order[i] for i in range(20)) == list(range(20))
  assert [order[i] for i in range(20)] != [order[i] for i in range(20, 40)]


def test_eval_positions_cover_each_example_once():
  for n, g, p in [(10, 4, 2), (48, 32, 4), (7, 8, 8), (64, 16, 1)]:
    rows = np.concatenate([pipeline.eval_positions(n, g, i, p) for i in range(p)])
    real = rows[rows >= 0]
    assert sorted(real.tolist()) == list(range(n))
    assert len(rows) % g == 0


def test_train_pipeline_resumes_exactly(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  source = sources.open_split(config.dataset.name, "train", tiny_data_dir)
  labels = sources.read_metadata(source)["label"]
  it = iter(pipeline.train_dataset(source, labels, config.input, seed=0))
  first = next(it)
  assert first["image"].shape == (24, 48, 48, 3) and first["label"].shape == (24,)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = iter(pipeline.train_dataset(source, labels, config.input, seed=0))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_eval_pipeline_pads_with_mask(tiny_data_dir):
  source = sources.open_split("synthetic_tissue/tiny", "test", tiny_data_dir)
  batches = list(pipeline.eval_dataset(source, 48, global_batch=40))
  assert [int(b["mask"].sum()) for b in batches] == [40, 8]
  assert (batches[-1]["index"][8:] == -1).all()
  assert (batches[-1]["image"][8:] == 0).all()


def test_dihedral_covers_all_eight_orientations():
  image = np.arange(4).reshape(2, 2, 1)
  rng = np.random.default_rng(0)
  seen = {augment.random_dihedral(image, rng).tobytes() for _ in range(200)}
  assert len(seen) == 8


def test_crop_smaller_than_input_names_the_field():
  with pytest.raises(ValueError, match="input.image_size=64"):
    augment.center_crop(np.zeros((32, 32, 3), np.uint8), 64)


def test_random_resized_crop_size_and_content():
  rng = np.random.default_rng(0)
  image = np.zeros((64, 64, 3), np.uint8)
  image[:, 32:] = 255  # left half black, right half white
  means = []
  for _ in range(50):
    out = augment.random_resized_crop(image, 40, rng, scale=(0.1, 0.3))
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    means.append(out.mean())
  # Small crops land mostly in one half: some near-black, some near-white.
  assert min(means) < 60 and max(means) > 195


def test_random_resized_crop_falls_back_to_centre_square():
  rng = np.random.default_rng(0)
  image = np.arange(8 * 4 * 3, dtype=np.uint8).reshape(8, 4, 3)
  # An aspect ratio range no box can satisfy inside a 8x4 image at full area.
  out = augment.random_resized_crop(image, 4, rng, scale=(1.0, 1.0), ratio=(4.0, 4.0))
  np.testing.assert_array_equal(out, image[2:6])


def test_two_view_batches(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  config.input.crop = "random_resized"
  config.input.sampler = "shuffle"
  source = sources.open_split(config.dataset.name, "train", tiny_data_dir)
  labels = sources.read_metadata(source)["label"]
  batch = next(iter(pipeline.train_dataset(source, labels, config.input, seed=0, views=2)))
  assert set(batch) == {"view1", "view2", "label"}
  assert batch["view1"].shape == batch["view2"].shape == (24, 48, 48, 3)
  assert not np.array_equal(batch["view1"], batch["view2"])  # independent crops of each patch
