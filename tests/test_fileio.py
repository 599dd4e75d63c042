"""Workdir files on an object store, exercised through a stand-in for gs://.

gs:// itself cannot be reached from a test machine. epath sends gs:// paths to
fsspec's "gcs" filesystem; here that is a local folder that, like GCS, refuses
to append to a file. Orbax (tensorstore's own GCS driver) and TFDS/ArrayRecord
readers are not covered by this stand-in.
"""

import json

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.local import LocalFileSystem

from histojax import config as config_lib
from histojax import export, fileio, indexing, monitor
from histojax.indexing import writer
from tests.conftest import tiny_config


class _FakeGCS(LocalFileSystem):
  """gs://bucket/key -> <root>/bucket/key; append mode refused, as gcsfs does."""
  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, finalize_on_close=True, **kwargs):
    del finalize_on_close  # gcsfs's option, which epath passes
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return cls.root.rstrip("/") + "/" + path.lstrip("/") if not path.startswith(cls.root) else path

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("GCS objects cannot be appended to")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """A gs://bucket root backed by tmp_path/bucket."""
  monkeypatch.setattr(_FakeGCS, "root", str(tmp_path))
  fsspec.register_implementation("gcs", _FakeGCS, clobber=True)
  fsspec.register_implementation("gs", _FakeGCS, clobber=True)
  _FakeGCS.clear_instance_cache()
  (tmp_path / "bucket").mkdir()
  return epath.Path("gs://bucket"), tmp_path / "bucket"


def test_stand_in_behaves_like_an_object_store(gcs):
  root, disk = gcs
  assert not fileio.is_local(root) and fileio.is_local(disk)
  (root / "a.txt").write_text("x")
  assert (disk / "a.txt").read_text() == "x"
  with pytest.raises(NotImplementedError):
    (root / "a.txt").open("a")


def test_metrics_log_grows_across_runs_without_append(gcs):
  root, disk = gcs
  path = root / "run" / "train_metrics.jsonl"
  (root / "run").mkdir()
  first = monitor.JsonLines(path, rewrite_seconds=0.0)
  first.append({"step": 1})
  assert [json.loads(x)["step"] for x in (disk / "run" / "train_metrics.jsonl").read_text().splitlines()] == [1]
  first.append({"step": 2})
  first.close()
  resumed = monitor.JsonLines(path, rewrite_seconds=3600.0)  # rows wait for close
  resumed.append({"step": 3})
  assert len(path.read_text().splitlines()) == 2
  resumed.close()
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_index_round_trip_on_object_store(gcs):
  root, disk = gcs
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(200, 16)).astype(np.float32)
  cfg = tiny_config("").eval.index
  cfg.mode = "brute_force"
  built = indexing.build(gallery, cfg, k=5)
  writer.save(built, root / "run" / "index", {"count": 200})
  assert (disk / "run" / "index" / "scann").is_dir()
  assert not (disk / "run" / ".index.partial").exists()
  loaded, manifest = indexing.load(root / "run" / "index")
  assert manifest["mode"] == "brute_force" and manifest["count"] == 200
  queries = rng.normal(size=(10, 16)).astype(np.float32)
  np.testing.assert_array_equal(indexing.search(loaded, queries, 5)[0], indexing.search(built, queries, 5)[0])


def test_export_and_config_on_object_store(gcs):
  root, _ = gcs
  emb = np.eye(4, 8, dtype=np.float32)
  result = export.Export(emb, np.arange(4), np.array(["a", "a", "b", "b"]), np.zeros((4, 2), np.int32),
                         {"split": "test", "count": 4})
  directory = root / "run" / "export" / "test"
  staging = directory.parent / f".{directory.name}.partial"  # as export_split stages it
  (staging / "chunks").mkdir(parents=True)
  export._write(directory, staging, result)
  assert not staging.exists()
  loaded = export.load(directory)
  np.testing.assert_array_equal(loaded.embeddings, emb)
  assert loaded.manifest == {"split": "test", "count": 4}

  config = tiny_config("")
  config.mesh.rules = (("head/", "replicate"), (".*", "fsdp"))
  config_lib.save(config, root / "run" / "config.json")
  assert config_lib.load(root / "run" / "config.json").to_dict() == config.to_dict()


def test_atomic_writes_leave_no_partial_and_keep_the_old_file_on_failure(tmp_path):
  path = tmp_path / "out" / "a.json"
  fileio.write_json(path, {"b": 1, "a": [1, 2]})
  assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(path, "w") as f:
      f.write("half")
      raise RuntimeError("interrupted")
  assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}  # old content intact
  assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no staging file left
  with pytest.raises(ValueError, match="whole files"):
    with fileio.atomic_open(path, "a"):
      pass


def test_npy_and_npz_round_trip_on_object_store(gcs):
  root, disk = gcs
  array = np.arange(12, dtype=np.int16).reshape(3, 4)
  fileio.save_npy(root / "x" / "a.npy", array)
  fileio.save_npz(root / "x" / "b.npz", label=array[0], source_id=np.array(["s1", "s2"]))
  fileio.write_atomic(root / "x" / "c.bin", b"\x00\x01")
  assert sorted(p.name for p in (disk / "x").iterdir()) == ["a.npy", "b.npz", "c.bin"]
  np.testing.assert_array_equal(fileio.load_npy(root / "x" / "a.npy"), array)
  rows = fileio.load_npz(root / "x" / "b.npz")
  assert rows["source_id"].tolist() == ["s1", "s2"] and rows["label"].tolist() == [0, 1, 2, 3]
  assert (disk / "x" / "c.bin").read_bytes() == b"\x00\x01"
  with pytest.raises(FileNotFoundError, match="missing.npy"):
    fileio.load_npy(root / "x" / "missing.npy")
