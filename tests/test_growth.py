"""Growing a saved index: append / delete per mode against exact search, the
rebalance policy, and crash safety of the on-disk swap (no model needed)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from histojax import fileio, indexing
from histojax.indexing import curator, growth, searcher, writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clustered(rng, n, centers, dim=32, noise=0.3):
  labels = rng.integers(0, len(centers), n)
  return indexing.l2_normalize(centers[labels] + noise * rng.normal(size=(n, dim))), labels


def _exact(gallery, queries, k):
  return indexing.exact_search(indexing.l2_normalize(gallery), indexing.l2_normalize(queries), k)


def _recall(found, truth):
  return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.mark.parametrize("mode", ["exact", "brute_force"])
def test_append_then_delete_equals_exact_search_on_the_same_rows(mode):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(6, 32))
  gallery, _ = _clustered(rng, 500, centers)
  new, _ = _clustered(rng, 120, centers)
  idx = searcher.append(indexing.build(gallery, {"mode": mode}, k=10), new)
  both = np.concatenate([gallery, new])
  queries, _ = _clustered(rng, 40, centers)
  assert idx.size == 620
  np.testing.assert_array_equal(indexing.search(idx, queries, 10)[0], _exact(both, queries, 10)[0])
  gone = [0, 5, 499, 500, 619, 618, 300]
  idx, order = searcher.delete(idx, gone)
  assert idx.size == 613 and not set(gone) & set(order.tolist()) and len(set(order.tolist())) == 613
  # Row r of the grown index is old row order[r]: the searcher and the rows agree.
  np.testing.assert_array_equal(indexing.search(idx, queries, 10)[0], _exact(both[order], queries, 10)[0])


def test_delete_order_fills_each_hole_with_the_last_row():
  assert searcher.delete_order(6, [1, 4]).tolist() == [0, 5, 2, 3]  # 4 <- 5, then 1 <- 5 (the last again)
  assert searcher.delete_order(6, [5]).tolist() == [0, 1, 2, 3, 4]
  assert searcher.delete_order(3, [0, 1, 2]).tolist() == []


def test_adc_rows_are_encoded_with_the_models_codebooks():
  rng = np.random.default_rng(1)
  codebooks = rng.normal(size=(4, 16, 8)).astype(np.float32)
  from histojax import pq
  gallery = rng.normal(size=(200, 32)).astype(np.float32)
  idx = indexing.build(None, {"mode": "auto"}, codes=pq.encode(gallery, codebooks), codebooks=codebooks)
  new = rng.normal(size=(30, 32)).astype(np.float32)
  grown = searcher.append(idx, new)
  np.testing.assert_array_equal(grown.codes[200:], pq.encode(new, codebooks))
  queries = rng.normal(size=(5, 32)).astype(np.float32)
  fresh = indexing.build(None, {"mode": "auto"}, codes=pq.encode(np.concatenate([gallery, new]), codebooks),
                      codebooks=codebooks)
  np.testing.assert_array_equal(indexing.search(grown, queries, 10)[0], indexing.search(fresh, queries, 10)[0])


def test_tree_ah_rows_from_unseen_clusters_trigger_a_rebalance_that_restores_recall():
  rng = np.random.default_rng(2)
  centers = rng.normal(size=(24, 32))
  gallery, _ = _clustered(rng, 20_000, centers[:20])
  idx = indexing.build(gallery, {"mode": "tree_ah"}, k=10)
  record = growth.growth_record({"count": idx.size})
  same, _ = _clustered(rng, 500, centers[:20])  # 2.5%, from the clusters the tree was trained on
  idx = searcher.append(idx, same)
  record["changed_since_training"] += 500
  assert not growth.maybe_rebalance(idx, record, added=same) and record["last_probe_recall"] == 1.0
  new, _ = _clustered(rng, 300, centers[20:])  # 1.5% more, from clusters it never saw
  idx = searcher.append(idx, new)
  record["changed_since_training"] += 300
  both = np.concatenate([gallery, same, new])
  queries, _ = _clustered(rng, 200, centers[20:])
  truth = _exact(both, queries, 10)[0]
  before = _recall(indexing.search(idx, queries, 10)[0], truth)
  # Under the 5% drift threshold, but the probe of the new rows sees the misses.
  assert growth.maybe_rebalance(idx, record, added=new)
  assert record["last_probe_recall"] < growth.MIN_PROBE_RECALL
  assert record["trained_rows"] == 20_800 and record["changed_since_training"] == 0
  assert record["probe_recall_after_rebalance"] >= growth.MIN_PROBE_RECALL
  after = _recall(indexing.search(idx, queries, 10)[0], truth)
  # ScaNN's k-means is threaded, so recall moves by a few of the 2,000 results from run to
  # run (0.9895 seen in a full suite, 0.99+ alone): the bar is the gain, not the last digit.
  assert before < 0.97 and after >= 0.98 and after - before >= 0.02, (before, after)
  # The drift threshold alone: 5% of the rows changed since training retrains too.
  record["changed_since_training"] = 1040
  assert growth.maybe_rebalance(idx, record)


def test_a_retrain_whose_probe_stays_low_is_retried_up_to_the_limit(monkeypatch):
  # ScaNN's threaded k-means once landed a worse partition (CI: recall@10 0.96 -> 0.86);
  # the probe after each retrain catches it. A searcher stands in whose retrains are
  # scripted: bad, then good; and one that is always bad.
  class Searcher:
    calls = 0

    def rebalance(self):
      self.calls += 1

  for after_each, tries in (([0.85, 0.99], 2), ([0.5] * 9, growth.REBALANCE_TRIES)):
    scripted = Searcher()
    idx = indexing.Index("tree_ah", None, scripted, size=100, dim=4)
    probes = iter([0.9] + after_each)  # the probe before, then one per retrain
    monkeypatch.setattr(growth, "probe_recall", lambda *_: next(probes))
    record = growth.growth_record({"count": 90})
    assert growth.maybe_rebalance(idx, record, added=np.ones((10, 4)))
    assert scripted.calls == tries and record["rebalance_tries"] == tries
    assert record["last_probe_recall"] == 0.9 and record["probe_recall_after_rebalance"] == after_each[tries - 1]
    assert record["trained_rows"] == 100


# --- On disk -----------------------------------------------------------------------

def _saved(tmp_path, mode="brute_force", n=300):
  rng = np.random.default_rng(3)
  gallery = rng.normal(size=(n, 16)).astype(np.float32)
  rows = {"label": rng.integers(0, 3, n), "source_id": np.array([f"img{i // 10:03d}" for i in range(n)]),
          "coords": np.zeros((n, 2), np.int32)}
  directory = tmp_path / "index"
  # tree_ah here checks the plumbing (every leaf searched); its recall is tested above.
  cfg = {"mode": mode, **({"num_leaves": 4, "leaves_to_search": 4} if mode == "tree_ah" else {})}
  writer.save(indexing.build(gallery, cfg), directory, {"class_names": ["a", "b", "c"]}, rows)
  return str(directory), gallery


def _cases(rng, m, source="new001", label=1):
  patches = rng.integers(0, 255, (m, 8, 8, 3), dtype=np.uint8)
  return curator.Cases(patches, rng.normal(size=(m, 16)).astype(np.float32), np.full(m, label),
                      np.full(m, source), np.tile(np.arange(m, dtype=np.int32)[:, None], (1, 2)))


@pytest.mark.parametrize("mode", ["exact", "brute_force", "tree_ah"])
def test_add_and_remove_on_disk(tmp_path, mode):
  directory, gallery = _saved(tmp_path, mode)
  rng = np.random.default_rng(4)
  cases = _cases(rng, 12)
  summary = curator.add(directory, cases)
  assert summary["rows_before"] == 300 and summary["rows_after"] == 312
  idx, manifest = indexing.load(directory)
  rows = indexing.load_rows(directory)
  assert manifest["count"] == idx.size == 312 and manifest["growth"]["generation"] == 1
  assert rows["dataset_row"][:300].tolist() == list(range(300)) and (rows["dataset_row"][300:] == -1).all()
  # An added case is found as itself, and its patch is kept for the service.
  found, scores = indexing.search(idx, cases.embeddings[:3], 1)
  assert found[:, 0].tolist() == [300, 301, 302] and np.allclose(scores[:, 0], 1, atol=1e-3)
  import io

  import PIL.Image
  with PIL.Image.open(io.BytesIO(indexing.added_patch_png(directory, rows, 305))) as im:
    np.testing.assert_array_equal(np.asarray(im), cases.patches[5])
  with pytest.raises(ValueError, match="already in the index"):
    curator.add(directory, cases)
  curator.remove(directory, ["new001", "img000"])
  idx, manifest = indexing.load(directory)
  rows = indexing.load_rows(directory)
  assert idx.size == 290 and manifest["growth"]["generation"] == 2
  assert not {"new001", "img000"} & set(rows["source_id"].tolist())
  assert not os.listdir(os.path.join(directory, "patches"))  # the batch's rows are all gone
  # What is left answers as a fresh index of the same dataset rows does.
  kept = rows["dataset_row"]
  queries = rng.normal(size=(8, 16)).astype(np.float32)
  got = indexing.search(idx, queries, 5)[0]
  want = _exact(gallery[kept], queries, 5)[0]
  assert _recall(got, want) >= (1.0 if mode != "tree_ah" else 0.95)
  with pytest.raises(KeyError, match="no row of the index"):
    curator.remove(directory, ["nope"])


def test_an_add_that_fails_mid_write_leaves_the_index_as_it_was(tmp_path, monkeypatch):
  directory, _ = _saved(tmp_path)
  before = {name: open(os.path.join(directory, name), "rb").read() for name in ("manifest.json", "rows.npz")}
  real_savez = np.savez

  def broken(path, **arrays):
    real_savez(path, **arrays)
    raise OSError("disk full (simulated)")
  monkeypatch.setattr(writer.np, "savez", broken)
  with pytest.raises(OSError, match="disk full"):
    curator.add(directory, _cases(np.random.default_rng(5), 4))
  monkeypatch.undo()
  assert {n: open(os.path.join(directory, n), "rb").read() for n in before} == before
  assert indexing.load(directory)[0].size == 300
  curator.add(directory, _cases(np.random.default_rng(5), 4))  # clears the leftover, then works
  assert indexing.load(directory)[0].size == 304
  assert not os.path.exists(os.path.join(tmp_path, ".index.next"))


KILL_SCRIPT = """
import os, signal, sys
import numpy as np
from histojax import fileio
from histojax.indexing import curator, writer
where = sys.argv[2]
if where == "rows":
  real = np.savez
  def kill(path, **arrays):
    real(path, **arrays); os.kill(os.getpid(), signal.SIGKILL)
  writer.np.savez = kill
else:  # between the two renames of the fallback swap
  fileio.exchange = lambda a, b: False
  real_rename, calls = os.rename, []
  def rename(a, b):
    calls.append(a)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGKILL)
    real_rename(a, b)
  fileio.os.rename = rename
rng = np.random.default_rng(6)
m = 5
curator.add(sys.argv[1], curator.Cases(rng.integers(0, 255, (m, 8, 8, 3), dtype=np.uint8),
           rng.normal(size=(m, 16)).astype(np.float32), np.ones(m, int), np.full(m, "k"), np.zeros((m, 2), int)))
"""


@pytest.mark.parametrize("where", ["rows", "between_renames"])
def test_an_add_killed_mid_write_leaves_a_readable_index(tmp_path, where):
  directory, _ = _saved(tmp_path)
  manifest = json.loads(open(os.path.join(directory, "manifest.json")).read())
  done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, directory, where], cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
  assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
  if where == "rows":  # killed before the swap: the index is untouched
    assert indexing.load(directory)[0].size == 300
    assert json.loads(open(os.path.join(directory, "manifest.json")).read()) == manifest
  else:  # killed with the index moved aside: recovery finishes the swap the new folder was whole for
    assert not os.path.exists(directory)
    fileio.recover_folder(directory)
    assert indexing.load(directory)[0].size == 305
  fileio.recover_folder(directory)
  assert sorted(os.listdir(tmp_path)) == [".index.lock", "index"]  # nothing half-written left


class Engine:
  """What `curator.add_upload` needs of a query engine: a cut (8 px tiles) and an embedding."""

  class model:  # noqa: N801  (the engine's `model` attribute)
    @staticmethod
    def expected_by(manifest):
      return {}

    @staticmethod
    def embed(patches):
      flat = patches.reshape(len(patches), -1).astype(np.float32)
      return flat[:, :16] - 127.5

  @staticmethod
  def cut(image):
    tiles = [image[y:y + 8, x:x + 8] for y in range(0, image.shape[0] - 7, 8) for x in range(0, image.shape[1] - 7, 8)]
    return type("Patches", (), {"images": np.stack(tiles), "coords": [(0, 0)] * len(tiles), "dropped": 0})


def test_an_upload_is_checked_under_the_lock_and_may_bring_a_new_class(tmp_path):
  directory, _ = _saved(tmp_path)
  image = np.random.default_rng(7).integers(0, 255, (16, 16, 3), dtype=np.uint8)
  with pytest.raises(curator.UnknownClass, match="'d' is not one of the index's classes"):
    curator.add_upload(Engine, directory, "up1", image, "d")
  with fileio.folder_lock(directory), pytest.raises(fileio.FolderBusy, match="another writer"):
    curator.add_upload(Engine, directory, "up1", image, "b")  # the lock is held: at once, not waiting
  with fileio.folder_lock(directory), pytest.raises(fileio.FolderBusy):
    curator.remove(directory, ["img000"], wait=False)
  summary = curator.add_upload(Engine, directory, "up1", image, "d", new_class=True)
  assert (summary["rows_added"], summary["label_id"], summary["new_class"], summary["generation"]) == (4, 3, True, 1)
  manifest = indexing.read_manifest(directory)
  assert manifest["class_names"] == ["a", "b", "c", "d"] and manifest["growth"]["log"][-1]["new_class"] == "d"
  assert indexing.load_rows(directory)["label"][-4:].tolist() == [3] * 4
  again = curator.add_upload(Engine, directory, "up2", image, "d", new_class=True)  # now a known class
  assert again["new_class"] is False and indexing.read_manifest(directory)["class_names"] == ["a", "b", "c", "d"]
  with pytest.raises(curator.SourceExists, match="already in the index"):
    curator.add_upload(Engine, directory, "up1", image, "a")
  with pytest.raises(curator.UnusableImage):
    curator.add_upload(Engine, directory, "up3", image[:4, :4], "a")  # not one tile
  with pytest.raises(curator.UnknownSource):
    curator.remove(directory, ["up9"])
  assert curator.remove(directory, ["up1", "up2"])["generation"] == 3 and indexing.load(directory)[0].size == 300


UPLOAD_KILL_SCRIPT = """
import os, signal, sys
import numpy as np
from histojax.indexing import curator, writer
from tests.test_growth import Engine
real = np.savez
def kill(path, **arrays):
  real(path, **arrays); os.kill(os.getpid(), signal.SIGKILL)
writer.np.savez = kill
image = np.random.default_rng(8).integers(0, 255, (16, 16, 3), dtype=np.uint8)
curator.add_upload(Engine, sys.argv[1], "up1", image, "new class", new_class=True)
"""


def test_an_upload_killed_mid_write_leaves_the_previous_index(tmp_path):
  """The service's additions (a new class included) write through the same swap as the CLI."""
  directory, _ = _saved(tmp_path)
  before = {name: open(os.path.join(directory, name), "rb").read() for name in ("manifest.json", "rows.npz")}
  done = subprocess.run([sys.executable, "-c", UPLOAD_KILL_SCRIPT, directory], cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
  assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
  assert {n: open(os.path.join(directory, n), "rb").read() for n in before} == before
  assert indexing.load(directory)[0].size == 300 and indexing.read_manifest(directory)["class_names"] == ["a", "b", "c"]
  assert curator.add_upload(Engine, directory, "up1", np.zeros((8, 8, 3), np.uint8), "c")["generation"] == 1
  assert not os.path.exists(os.path.join(tmp_path, ".index.next"))


def test_evaluate_never_overwrites_an_index_grown_by_hand(tmp_path):
  """`evaluate` rebuilds `<workdir>/index` when the export changed; cases added with
  `index add` live only there, so a grown index is searched around, never replaced."""
  from histojax import export, retrieval
  from tests.conftest import tiny_config
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(40, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  gallery = export.Export(emb, np.arange(40) % 4, np.array([f"s{i // 4}" for i in range(40)]),
                          np.zeros((40, 2), np.int32), {"step": 1, "fingerprint": "f", "dataset": "d", "split": "train"})
  config = tiny_config("")
  config.eval.index.mode = "exact"
  idx = indexing.build(emb[:30], config.eval.index, k=5)
  writer.save(idx, tmp_path / "index", {"count": 30, "growth": {"generation": 1}},
             {"label": gallery.label[:30], "source_id": gallery.source_id[:30], "coords": gallery.coords[:30]})
  before = {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir() if p.is_file()}
  found, _ = retrieval.build_or_reuse_index(config, tmp_path, gallery, 5)
  assert found.size == 40  # evaluation searched the whole export
  assert {p.name: p.read_bytes() for p in (tmp_path / "index").iterdir() if p.is_file()} == before
