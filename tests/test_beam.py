"""The Beam route of the archive builders (requirements-beam.txt): the same dataset as
the local route, record for record, under the DirectRunner in 2 worker processes;
drop and corrupt counts from Beam metrics; a corrupt image stops the job, named."""

import json
import os
import subprocess
import sys

import pytest

beam = pytest.importorskip("apache_beam", reason="apache-beam is not installed (the Beam route is an optional "
                           "extra: pip install -r requirements-beam.txt; .ci/run installs it)")

from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: E402

from histojax.data import sources  # noqa: E402
from tensorflow_datasets.proto import tf_example_pb2  # noqa: E402
from tests.archive_fixtures import BACH_CONFIG, bach_archive, build, pair_archive, save, tissue  # noqa: E402
from tfds_builders import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECT_2 = "runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"


def _direct(workers=2):
  return sources.beam_pipeline_options("DirectRunner", (), workers)


def _shards(b):
  """split -> [(shard file name, its records)] as written, each record in canonical form.

  TFDS serializes a tf.Example's feature map in upb's iteration order, which is
  seeded per process: two local builds (separate processes) write the same
  features in a different order too. Re-serialized deterministically, a record
  is its exact feature bytes in key order.
  """
  out = {}
  for split, info in b.info.splits.items():
    out[split] = []
    for path in info.filepaths:
      records = ArrayRecordDataSource([os.fspath(path)])
      out[split].append((path.name, [tf_example_pb2.Example.FromString(records[i]).SerializeToString(deterministic=True)
                                     for i in range(len(records))]))
  return out


def _keys(ds):
  return {split: [f"{x['source_id'].decode()}:{x['coords'][0]}:{x['coords'][1]}" for x in (s[i] for i in range(len(s)))]
          for split, s in ds.items()}


def _metadata_json(b):
  return json.loads((b.data_path / "metadata.json").read_text())


def test_beam_route_writes_the_local_routes_dataset(tmp_path):
  photos = bach_archive(tmp_path / "raw")
  bad = photos / "Benign" / "b003.tiff"
  bad.write_bytes(bad.read_bytes()[:200])  # truncated: skipped and counted
  save(photos / "Normal" / "n002.tif", tissue(64, 96, seed=7, glass=96))  # all glass: keeps no tile
  local_ds, local = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "local", skip_corrupt=True)
  beam_ds, beamed = build("bach", BACH_CONFIG, tmp_path / "raw", tmp_path / "beam", skip_corrupt=True,
                          beam_options=_direct(2))

  assert set(beamed.info.splits) == set(local.info.splits) == {"train", "validation", "test"}
  for split in local.info.splits:
    assert beamed.info.splits[split].shard_lengths == local.info.splits[split].shard_lengths
    assert beamed.info.splits[split].num_bytes == local.info.splits[split].num_bytes
  # Same shard files, same records in the same order, feature bytes equal.
  local_shards, beam_shards = _shards(local), _shards(beamed)
  assert beam_shards == local_shards and all(r for shards in local_shards.values() for _, r in shards)
  keys = _keys(local_ds)
  assert _keys(beam_ds) == keys and all(len(set(k)) == len(k) for k in keys.values())

  # The counts come from Beam counters (and a string set for the names) on one
  # route and the generator on the other, and land in metadata.json the same.
  assert _metadata_json(beamed) == _metadata_json(local)
  built = beamed.info.metadata["splits"]
  split_of = {s: split for split, k in keys.items() for s in {key.split(":")[0] for key in k}}
  assert "b003" not in split_of and "n002" not in split_of
  assert sum(s["corrupt_skipped"] == [str(bad)] for s in built.values()) == 1
  assert sum(s["images_without_tiles"] for s in built.values()) == 1
  assert sum(s["source_images"] for s in built.values()) == 20
  for split, stats in built.items():
    assert stats["tiles_kept"] == len(keys[split])
    assert stats["tiles_kept"] + stats["tiles_dropped"] == 6 * (stats["source_images"] - len(stats["corrupt_skipped"]))
  assert sources.summary(beamed)["splits"] == sources.summary(local)["splits"]


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})


def test_prepare_cli_beam_route_stops_on_a_corrupt_image_and_names_it(tmp_path):
  pair_archive(tmp_path / "raw")
  (tmp_path / "raw" / "test" / "b1c2d3e4f5a6.png").write_bytes(b"not a png")
  run = _cli("histojax.prepare", "--dataset", "pair_query", "--manual_dir", str(tmp_path / "raw"),
             "--data_dir", str(tmp_path / "data"), "--beam_runner", "DirectRunner", "--workers", "2")
  assert run.returncode == 1, run.stderr[-3000:]
  error = run.stderr[run.stderr.index("error: "):]
  assert "b1c2d3e4f5a6.png" in error and "--skip_corrupt" in error and "Traceback" not in error
  assert not sources.builder("pair_query", str(tmp_path / "data")).is_prepared()


def test_tfds_build_command_with_beam_pipeline_options(tmp_path):
  pair_archive(tmp_path / "raw")
  run = _cli("tfds_builders.tfds_build", "pair_query", "--imports", "tfds_builders", "--manual_dir",
             str(tmp_path / "raw"), "--data_dir", str(tmp_path / "beam"), "--file_format", "array_record",
             f"--beam_pipeline_options={DIRECT_2}")
  assert run.returncode == 0, run.stderr[-3000:]
  beamed = sources.builder("pair_query", str(tmp_path / "beam"))
  _, local = build("pair_query", "default", tmp_path / "raw", tmp_path / "local")
  assert _shards(beamed) == _shards(local)
  assert _metadata_json(beamed) == _metadata_json(local)
  assert _metadata_json(beamed)["splits"]["test"]["source_images"] == 4


def test_beam_pipeline_options():
  options = _direct(2).get_all_options()
  assert (options["runner"], options["direct_num_workers"], options["direct_running_mode"]) == (
      "DirectRunner", 2, "multi_processing")
  mine = sources.beam_pipeline_options("DirectRunner", ["--direct_running_mode=in_memory"], 2).get_all_options()
  assert mine["direct_running_mode"] == "in_memory"  # the user's flags win
  dataflow = sources.beam_pipeline_options("DataflowRunner", ["--project=p", "--region=europe-west4"]).get_all_options()
  assert (dataflow["runner"], dataflow["project"], dataflow["region"]) == ("DataflowRunner", "p", "europe-west4")
  assert sources.beam_pipeline_options(None) is None
  with pytest.raises(ValueError, match="unknown Beam runner"):
    sources.beam_pipeline_options("Dataflow")
  with pytest.raises(ValueError, match="without a Beam runner"):
    sources.beam_pipeline_options(None, ["--project=p"])
  with pytest.raises(ValueError, match="does not read an archive"):
    sources.prepare("synthetic_tissue", beam_runner="DirectRunner")
  assert common._corrupt_image_in("RuntimeError: ... tfds_builders.common.CorruptImageError: cannot decode image "
                                  "/a/b.png: OSError: x\nNothing was marked prepared. Replace the file, or pass "
                                  "--skip_corrupt to leave it out and count it. [while running 'x']") == (
      "cannot decode image /a/b.png: OSError: x\nNothing was marked prepared. Replace the file, or pass "
      "--skip_corrupt to leave it out and count it.")
