"""The decoded-tile cache (histojax/data/decoded.py): same pixels, same stream, its folder cleaned up."""

import gc
import io
import os
import pickle
import types

import numpy as np
import PIL.Image
from absl import flags

from histojax.data import decoded, images, pipeline, sources
from tests.conftest import tiny_config


def _batches(source, labels, config, n=3, **kw):
  it = iter(pipeline.train_dataset(source, labels, config.input, seed=0, **kw))
  return [next(it) for _ in range(n)]


def test_training_stream_is_the_same_with_and_without_the_cache(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  source = sources.open_split(config.dataset.name, "train", tiny_data_dir)
  labels = sources.read_metadata(source)["label"]
  config.input.decoded_cache_gb = 0.0
  plain = _batches(source, labels, config)
  config.input.decoded_cache_gb = 1.0
  cached = _batches(source, labels, config)
  for want, got in zip(plain, cached):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  split = decoded.decode_split(source, labels, 1.0)
  assert isinstance(split, decoded.DecodedSplit) and len(split) == len(source)
  for i in (0, len(source) - 1):
    np.testing.assert_array_equal(split[i]["image"], images.decode_example(source[i]["image"]))
    assert split[i]["label"] == labels[i]


def test_a_worker_copy_reads_the_file_and_only_the_owner_removes_it(tiny_data_dir):
  source = sources.open_split("synthetic_tissue/tiny", "train", tiny_data_dir)
  labels = sources.read_metadata(source)["label"]
  owner = decoded.decode_split(source, labels, 1.0)
  folder = os.path.dirname(owner.path)
  assert oct(os.stat(folder).st_mode & 0o777) == "0o700"
  copy = pickle.loads(pickle.dumps(owner))
  assert len(pickle.dumps(owner)) < 4096  # a worker gets the file's name, not the pixels
  np.testing.assert_array_equal(copy[3]["image"], owner[3]["image"])
  del copy
  gc.collect()
  assert os.path.exists(owner.path)
  del owner
  gc.collect()
  assert not os.path.exists(folder)


def _png(shape):
  buf = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
  return {"image": buf.getvalue(), "label": 0}


def test_mixed_shapes_or_over_budget_read_encoded_and_leave_nothing_behind(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  import tempfile  # noqa: PLC0415
  monkeypatch.setattr(tempfile, "tempdir", None)
  mixed = [_png((32, 32, 3))] * 300 + [_png((40, 32, 3))]  # the odd one in the second chunk
  assert decoded.decode_split(mixed, np.zeros(len(mixed)), 1.0) is None
  same = [_png((32, 32, 3))] * 10
  assert decoded.decode_split(same, np.zeros(10), 10 * 32 * 32 * 3 / 2 ** 30 * 0.99) is None  # just over
  assert decoded.decode_split(same, np.zeros(10), 0.0) is None
  monkeypatch.setattr(decoded.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=0, used=0, free=0))  # no room
  assert decoded.decode_split(same, np.zeros(10), 1.0) is None
  monkeypatch.undo()
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  monkeypatch.setattr(tempfile, "tempdir", None)
  assert os.listdir(tmp_path) == []
  fits = decoded.decode_split(same, np.zeros(10), 10 * 32 * 32 * 3 / 2 ** 30)
  assert fits is not None and fits.images.shape == (10, 32, 32, 3)


def test_workers_read_the_cache_like_the_main_process(tiny_data_dir):
  if not flags.FLAGS.is_parsed():  # Grain's worker start reads its absl flags, as under app.run
    flags.FLAGS.mark_as_parsed()
  config = tiny_config(tiny_data_dir)
  source = sources.open_split(config.dataset.name, "train", tiny_data_dir)
  labels = sources.read_metadata(source)["label"]
  config.input.decoded_cache_gb = 1.0
  in_process = _batches(source, labels, config, n=2)
  config.input.num_workers = 1
  by_worker = _batches(source, labels, config, n=2)
  for want, got in zip(in_process, by_worker):
    np.testing.assert_array_equal(got["image"], want["image"])


def test_a_full_temporary_folder_reads_encoded(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  import tempfile  # noqa: PLC0415
  monkeypatch.setattr(tempfile, "tempdir", None)

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(np.lib.format, "open_memmap", full)
  same = [_png((32, 32, 3))] * 10
  assert decoded.decode_split(same, np.zeros(10), 1.0) is None
  assert os.listdir(tmp_path) == []
