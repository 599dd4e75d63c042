"""Hostile and damaged files for every reader of user files: each gives a named error,
runs nothing, exhausts nothing, and leaves what was already written as it was.

Fixtures are made here: checkpoints in torch's layouts (tests/hostile_checkpoints.py),
images (tests/image_fixtures.py), index/export folders and CSVs written by the code
under test, then damaged.
"""

import argparse
import collections
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from histojax import convert
from histojax.weights import readers, torch_pickle
from tests import hostile_checkpoints as H

ROOT = Path(__file__).resolve().parents[1]


def _weights(key="0"):
  return {"conv1.weight": H.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), key)}


# --- Checkpoints: code execution ----------------------------------------------------

def test_the_issue_exploit_through_the_convert_command(tmp_path):
  """The 60-byte file of the report: `pickle.dump({"state_dict": Evil()})`, given to the CLI."""
  marker = tmp_path / "PWNED"
  evil = tmp_path / "evil.pt"
  with open(evil, "wb") as f:
    pickle.dump({"state_dict": H.Payload(marker)}, f)
  out = subprocess.run([sys.executable, "-m", "histojax.convert", "--format", "torchvision_resnet",
                        "--input", str(evil), "--output", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1, out.stderr[-2000:]
  assert "error:" in out.stderr and "evil.pt" in out.stderr and "nothing was run" in out.stderr
  assert "Traceback" not in out.stderr
  assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["magic", "protocol", "sys_info", "main", "storage_keys"])
def test_legacy_payload_anywhere_is_refused(tmp_path, where):
  marker = tmp_path / "MARKER"
  evil = H.Payload(marker)
  obj = {"state_dict": evil} if where == "main" else _weights()
  kwargs = {{"magic": "magic", "protocol": "protocol", "sys_info": "sys_info",
             "storage_keys": "keys"}[where]: evil} if where != "main" else {}
  path = H.write_legacy(tmp_path / "evil.pth", obj, **kwargs)
  with pytest.raises(torch_pickle.HostileCheckpointError, match="evil.pth.*nothing was run"):
    torch_pickle.load(path)
  assert not marker.exists()


@pytest.mark.parametrize("layout", ["zip", "torchscript", "optimizer_state", "namespace", "subprocess", "eval"])
def test_zip_payloads_are_refused(tmp_path, layout):
  marker = tmp_path / "MARKER"
  evil = H.Payload(marker)

  class Popen:  # stands in for subprocess.Popen: only its name is pickled
    def __reduce__(self):
      return (subprocess.Popen, (["touch", str(marker)],))

  class Eval:
    def __reduce__(self):
      return (eval, (f"open({str(marker)!r}, 'w')",))

  if layout == "torchscript":
    module = type("Model", (), {"__module__": "__torch__", "__reduce_ex__": lambda self, p: (
        collections.OrderedDict, (), {"weight": evil})})
    obj, extra = module(), {"code/__torch__.py": b"def forward(self, x): return x\n", "constants.pkl": b"\x80\x02]q\x00."}
  else:
    obj, extra = {"zip": {"model": evil}, "optimizer_state": {"model": _weights(), "optimizer": {
        "state": {0: {"exp_avg": evil}}, "param_groups": [{"lr": 0.1}]}},
        "namespace": {"model": _weights(), "args": argparse.Namespace(lr=0.1, hook=evil)},
        "subprocess": {"model": Popen()}, "eval": {"model": Eval()}}[layout], None
  path = H.write_zip(tmp_path / "evil.pt", obj, extra=extra)
  with pytest.raises(torch_pickle.HostileCheckpointError, match="nothing was run"):
    readers.read_state_dict(path)
  assert not marker.exists()


def test_a_benign_namespace_and_optimizer_stay_inert_records(tmp_path):
  obj = {"model": _weights(), "args": argparse.Namespace(lr=0.1, arch="resnet50"),
         "optimizer": {"state": {0: {"exp_avg": H.Tensor(np.ones(3, np.float32), "1")}}}}
  loaded = torch_pickle.load(H.write_zip(tmp_path / "ok.pt", obj))
  assert isinstance(loaded["args"], torch_pickle.Opaque) and loaded["args"].state == {"lr": 0.1, "arch": "resnet50"}
  np.testing.assert_array_equal(loaded["optimizer"]["state"][0]["exp_avg"], np.ones(3))
  assert list(readers.read_state_dict(H.write_legacy(tmp_path / "ok.pth", obj))) == ["conv1.weight"]


# --- Checkpoints: sizes ----------------------------------------------------------------

def test_storage_entry_shorter_or_longer_than_declared(tmp_path):
  short = H.write_zip(tmp_path / "short.pt", _weights(), storage_bytes={"0": b"\0" * 20})
  with pytest.raises(torch_pickle.CheckpointReadError, match="short.pt: entry archive/data/0 declares 20 bytes, expected 24"):
    torch_pickle.load(short)
  long = H.write_zip(tmp_path / "long.pt", _weights(), storage_bytes={"0": b"\0" * 28})
  with pytest.raises(torch_pickle.CheckpointReadError, match="long.pt"):
    torch_pickle.load(long)
  missing = H.write_zip(tmp_path / "missing.pt", {"model": {"w": H.Tensor(np.ones(2), "7")}}, storage_bytes={})
  with zipfile.ZipFile(missing) as z, zipfile.ZipFile(tmp_path / "gone.pt", "w") as out:
    for info in z.infolist():
      if not info.filename.endswith("/data/7"):
        out.writestr(info, z.read(info))
  with pytest.raises(torch_pickle.CheckpointReadError, match="gone.pt: entry archive/data/7 is missing"):
    torch_pickle.load(str(tmp_path / "gone.pt"))


def test_declared_sizes_over_the_bound_are_refused_before_reading(tmp_path):
  huge = {"model": {"w": H.Tensor(np.ones(4), "0", size=(1 << 20, 1 << 20), stride=(1 << 20, 1), numel=1 << 40)}}
  for path in (H.write_zip(tmp_path / "huge.pt", huge), H.write_legacy(tmp_path / "huge.pth", huge)):
    with pytest.raises(torch_pickle.CheckpointReadError, match="declare 4,398,046,511,104 bytes, over the bound"):
      torch_pickle.load(path, max_bytes=1 << 30)
  # A deflated entry declaring more than its storage: refused from the zip directory alone.
  bomb = H.write_zip(tmp_path / "bomb.pt", {"model": {"w": H.Tensor(np.ones(4), "0")}},
                     storage_bytes={"0": b"\0" * (64 << 20)}, compression=zipfile.ZIP_DEFLATED)
  assert os.path.getsize(bomb) < 1 << 20
  with pytest.raises(torch_pickle.CheckpointReadError, match="declares 67,108,864 bytes, expected 16"):
    torch_pickle.load(bomb)


def test_a_stride_zero_view_cannot_claim_terabytes(tmp_path):
  """One stored float viewed as 10^12 elements: refused before the copy is allocated."""
  obj = {"model": {"w": H.Tensor(np.ones(1), "0", size=(1 << 20, 1 << 20), stride=(0, 0))}}
  with pytest.raises(torch_pickle.CheckpointReadError, match="would exceed the size bound"):
    torch_pickle.load(H.write_zip(tmp_path / "view.pt", obj), max_bytes=1 << 30)


def test_legacy_storage_longer_than_the_file(tmp_path):
  path = H.write_legacy(tmp_path / "long.pth", _weights(), numels={"0": 1 << 40})
  with pytest.raises(torch_pickle.CheckpointReadError, match="long.pth: storage 0 declares 1,099,511,627,776 elements"):
    torch_pickle.load(path)


def test_convert_bound_follows_the_model(tmp_path):
  assert convert.checkpoint_bound("torchvision_resnet") == 16 * convert.LARGEST_PUBLISHED["torchvision_resnet"]
  assert convert.checkpoint_bound("clip", max_checkpoint_gb=2) == 2 << 30
  assert convert.checkpoint_bound("timm_vit") > convert.checkpoint_bound("torchvision_resnet")


# --- Checkpoints: damaged files ------------------------------------------------------

def _damaged(data: bytes, how: str) -> bytes:
  if how == "empty":
    return b""
  if how == "truncated":
    return data[: len(data) // 2]
  if how == "bitflip":
    flipped = bytearray(data)
    for i in range(7, len(flipped), max(1, len(flipped) // 16)):
      flipped[i] ^= 0xA5
    return bytes(flipped)
  if how == "wrong_type":
    return b'{"model": "this is JSON"}\n'
  raise ValueError(how)


@pytest.mark.parametrize("how", ["empty", "truncated", "bitflip", "wrong_type"])
@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "npz"])
def test_damaged_checkpoints_give_a_named_error(tmp_path, kind, how):
  good = tmp_path / f"good.{kind}"
  if kind == "zip":
    H.write_zip(good, {"model": _weights()})
  elif kind == "legacy":
    H.write_legacy(good, {"model": _weights()})
  elif kind == "safetensors":
    from safetensors.numpy import save_file
    save_file({"conv1.weight": np.ones((4, 4), np.float32), "fc.bias": np.zeros(3, np.float32)}, str(good))
  else:
    np.savez(good, w=np.ones((4, 4), np.float32))
  suffix = {"zip": ".pt", "legacy": ".pth", "safetensors": ".safetensors", "npz": ".npz"}[kind]
  bad = tmp_path / f"bad{suffix}"
  bad.write_bytes(_damaged(good.read_bytes(), how))
  try:
    tensors = readers.read_state_dict(str(bad))
  except ValueError as e:  # CheckpointReadError, or "no tensors found": both name the file
    assert "bad" + suffix in str(e), e
    assert type(e).__module__.startswith(("histojax", "builtins")), type(e)
  else:  # a flip that only touched tensor bytes reads, as the format allows
    assert how == "bitflip" and all(isinstance(v, np.ndarray) for v in tensors.values())


@pytest.mark.parametrize("header", [b"\xff" * 8, (1 << 40).to_bytes(8, "little"), (20).to_bytes(8, "little")])
def test_safetensors_header_lies(tmp_path, header):
  path = tmp_path / "lie.safetensors"
  path.write_bytes(header + b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}' + b"\0" * 16)
  with pytest.raises(torch_pickle.CheckpointReadError, match="lie.safetensors"):
    readers.read_state_dict(str(path))


def test_safetensors_offsets_out_of_range_and_bad_json(tmp_path):
  import json
  import struct
  for name, meta in (("range", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}}),
                     ("json", None)):
    raw = json.dumps(meta).encode() if meta else b'{"w": {"dtype": "F32", "shape": [4], '
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(torch_pickle.CheckpointReadError, match=f"{name}.safetensors"):
      readers.read_state_dict(str(path))


def test_npz_with_pickled_objects_is_refused(tmp_path):
  marker = tmp_path / "MARKER"
  path = tmp_path / "objects.npz"
  np.savez(path, w=np.array([H.Payload(marker)], dtype=object))
  with pytest.raises(torch_pickle.CheckpointReadError, match="objects.npz.*allow_pickle"):
    readers.read_state_dict(str(path))
  assert not marker.exists()


# --- No unrestricted unpickling anywhere ----------------------------------------------

_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "torch",
                   "pandas"}
_FORBIDDEN = {"load", "loads", "Unpickler", "read_pickle", "open"}
_RESTRICTED_UNPICKLER = Path("histojax/weights/torch_pickle.py")


def pickle_reads(source: str, filename: str) -> list[str]:
  """Places in `source` that could unpickle: pickle-like modules' load/loads/Unpickler
  (however imported), and np.load / read_array with allow_pickle not literally False."""
  import ast
  tree = ast.parse(source, filename)
  aliases = {}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] in _PICKLE_MODULES:
          aliases[a.asname or a.name.split(".")[0]] = a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
      for a in node.names:
        if a.name in _FORBIDDEN:
          found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
      module = aliases[node.value.id]
      if node.attr in _FORBIDDEN and not (module == "shelve" and node.attr != "open"):
        allowed = node.attr == "Unpickler" and module == "pickle" and Path(filename) == _RESTRICTED_UNPICKLER
        if not allowed and not (module == "pandas" and node.attr != "read_pickle") and not (
            module in ("torch", "joblib", "dill", "cloudpickle", "marshal") and node.attr == "Unpickler"):
          found.append(f"{filename}:{node.lineno}: {node.value.id}.{node.attr}")
    if isinstance(node, ast.Call):
      name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
      if name in ("load", "read_array"):
        for kw in node.keywords:
          if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
            found.append(f"{filename}:{node.lineno}: {name}(..., allow_pickle={ast.unparse(kw.value)})")
  return found


def test_no_unrestricted_unpickling_anywhere():
  planted = ("import pickle as p\nimport numpy as np\nfrom dill import loads\nimport torch\n"
             "p.load(f)\nnp.load(f, allow_pickle=True)\ntorch.load(x)\nnp.load(f, allow_pickle=flag)\n")
  assert len(pickle_reads(planted, "planted.py")) == 5  # the checker sees every form
  found = []
  for folder in ("histojax", "tfds_builders", "bench", "configs", "launch"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      found += pickle_reads(path.read_text(), str(path.relative_to(ROOT)))
  assert not found, "unpickling outside histojax/weights/torch_pickle.py:\n" + "\n".join(found)


# --- Index, export and config folders ------------------------------------------------

DAMAGES = ["empty", "truncated", "bitflip", "wrong_type", "oversized"]


def _snapshot(folder: Path) -> dict:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _damage_file(path: Path, how: str) -> None:
  data = path.read_bytes()
  if how == "oversized":
    if path.suffix == ".npy":
      data = _npy_declaring_more(data)
    elif path.suffix == ".npz":  # a member whose header declares far more than it holds
      with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
      with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
          z.writestr(name, _npy_declaring_more(raw))
      return
    elif path.suffix == ".json":
      data = data + b" " * (2 << 20)  # beyond the (lowered) JSON bound of the test
    else:
      data = data + os.urandom(1 << 20)  # a megabyte of garbage appended
  elif how == "wrong_type":
    data = {".json": b"[1, 2, 3]\n", ".npy": b"\x93NUMPY\x01\x00v\x00" + b"not a header" * 9,
            ".npz": b"PK\x03\x04 not a zip at all"}.get(path.suffix, b"\x00\xff plain garbage \x00" * 8)
  else:
    data = _damaged(data, how)
  path.write_bytes(data)


def _npy_declaring_more(data: bytes) -> bytes:
  """The same .npy (format 1.0) with a header declaring 10^13 rows; the data left as it was."""
  import ast
  end = data.index(b"\n") + 1
  fields = ast.literal_eval(data[10:end].decode("latin1"))
  shape = (10**13, *fields["shape"][1:])
  header = f"{{'descr': {fields['descr']!r}, 'fortran_order': {fields['fortran_order']!r}, 'shape': {shape!r}, }}"
  header = header.ljust(end - 10 - 1) + "\n"
  assert len(header) == end - 10, "no room in the header"
  return data[:10] + header.encode("latin1") + data[end:]


def _index_folder(tmp_path: Path, mode: str) -> Path:
  import ml_collections
  from histojax import indexing
  from histojax.indexing import writer
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(300, 16)).astype(np.float32)
  cfg = ml_collections.ConfigDict(dict(mode=mode, num_leaves=0, leaves_to_search=0, reorder=0, dims_per_block=0))
  rows = {"label": np.arange(300) % 3, "source_id": np.array([f"s{i % 7}" for i in range(300)]),
          "coords": np.zeros((300, 2), np.int32)}
  writer.save(indexing.build(gallery, cfg), tmp_path / "index", {"dataset": "x"}, rows)
  return tmp_path / "index"


def _read_index(folder: Path):
  from histojax import indexing
  idx, manifest = indexing.load(folder)
  return idx, manifest, indexing.load_rows(folder)


@pytest.fixture(scope="module")
def built_indexes(tmp_path_factory):
  base = tmp_path_factory.mktemp("indexes")
  return {mode: _index_folder(base / mode, mode) for mode in ("exact", "tree_ah")}


def _files_of(mode):
  return {"exact": ["manifest.json", "rows.npz", "gallery.npy"],
          "tree_ah": ["manifest.json", "rows.npz", "scann/dataset.npy", "scann/datapoint_to_token.npy",
                      "scann/scann_config.pb", "scann/scann_assets.pbtxt", "scann/ah_codebook.pb"]}[mode]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("mode", ["exact", "tree_ah"])
def test_damaged_index_folders(built_indexes, tmp_path, monkeypatch, mode, how):
  import shutil
  from histojax import untrusted
  monkeypatch.setattr(untrusted, "MAX_JSON_BYTES", 1 << 20)
  for name in _files_of(mode):
    folder = tmp_path / name.replace("/", "_")
    shutil.copytree(built_indexes[mode], folder)
    _damage_file(folder / name, how)
    before = _snapshot(folder)
    try:
      idx, manifest, rows = _read_index(folder)
    except (ValueError, FileNotFoundError) as e:
      assert str(folder) in str(e), (name, how, e)
      assert type(e).__module__ in ("histojax.untrusted", "builtins"), (name, how, type(e), e)
    else:  # only a flip inside stored numbers or protobuf payload can go unseen
      assert how == "bitflip" and name.endswith((".npy", ".pb", ".npz")), (name, how)
      assert idx.size == manifest["count"] == len(rows["label"])
    assert _snapshot(folder) == before, f"reading damaged {name} ({how}) changed the folder"


def test_index_refuses_a_pickle_planted_for_scann(built_indexes, tmp_path):
  """ScaNN's load_searcher unpickles scann/scann_docids.pkl when present: never reached."""
  import shutil
  from histojax import indexing, untrusted
  folder = tmp_path / "index"
  shutil.copytree(built_indexes["tree_ah"], folder)
  marker = tmp_path / "MARKER"
  (folder / "scann" / "scann_docids.pkl").write_bytes(pickle.dumps(H.Payload(marker)))
  with pytest.raises(untrusted.CorruptFileError, match="scann_docids.pkl"):
    indexing.load(folder)
  (folder / "scann" / "scann_docids.pkl").unlink()
  np.save(folder / "scann" / "dataset.npy", np.array([H.Payload(marker)], dtype=object), allow_pickle=True)
  with pytest.raises(untrusted.CorruptFileError, match="Python objects"):
    indexing.load(folder)
  assert not marker.exists()


def _export_folder(tmp_path: Path) -> Path:
  import json
  folder = tmp_path / "export"
  folder.mkdir(parents=True)
  np.save(folder / "embeddings.npy", np.ones((5, 8), np.float32))
  np.savez(folder / "metadata.npz", label=np.arange(5), source_id=np.array(list("abcde")),
           coords=np.zeros((5, 2), np.int32))
  (folder / "manifest.json").write_text(json.dumps({"count": 5, "dataset": "x"}))
  return folder


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_export_folders(tmp_path, monkeypatch, how):
  from histojax import export, untrusted
  monkeypatch.setattr(untrusted, "MAX_JSON_BYTES", 1 << 20)
  assert export.load(_export_folder(tmp_path / "good")).embeddings.shape == (5, 8)
  for name in ("manifest.json", "embeddings.npy", "metadata.npz"):
    folder = _export_folder(tmp_path / f"{name}")
    _damage_file(folder / name, how)
    before = _snapshot(folder)
    try:
      loaded = export.load(folder)
    except (ValueError, FileNotFoundError) as e:
      assert str(folder) in str(e), (name, how, e)
    else:
      assert how == "bitflip" and name.endswith((".npy", ".npz")) and len(loaded.label) == 5, (name, how)
    assert _snapshot(folder) == before


def test_export_with_pickled_metadata_is_refused(tmp_path):
  from histojax import export, untrusted
  folder = _export_folder(tmp_path)
  marker = tmp_path / "MARKER"
  np.savez(folder / "metadata.npz", label=np.arange(5), source_id=np.array([H.Payload(marker)] * 5, dtype=object),
           coords=np.zeros((5, 2), np.int32))
  with pytest.raises(untrusted.CorruptFileError, match="metadata.npz.*Python objects"):
    export.load(folder)
  assert not marker.exists()


@pytest.mark.parametrize("how", DAMAGES + ["foreign_json"])
def test_damaged_config_json(tmp_path, monkeypatch, how):
  from histojax import config as config_lib
  from histojax import untrusted
  monkeypatch.setattr(untrusted, "MAX_JSON_BYTES", 1 << 20)
  path = tmp_path / "config.json"
  config_lib.save(config_lib.base_config(), path)
  assert config_lib.load(path).model.name == config_lib.base_config().model.name
  if how == "foreign_json":
    path.write_text('{"model": {"name": "resnet"}, "objective": {"name": "multi_similarity"}, "bogus": {"x": 1}}')
  else:
    _damage_file(path, how)
  before = path.read_bytes()
  try:
    config_lib.load(path)
  except ValueError as e:
    assert "config.json" in str(e), e
    assert type(e).__module__ == "histojax.untrusted", type(e)
  else:
    assert how == "bitflip"  # a flip inside a number's digits is still a valid config
  assert path.read_bytes() == before


# --- Pair-task CSVs ---------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"\x00\x01\x02 binary\x00", b"\xff\xfe\xfa not utf-8", b"a.png," + b"x" * 200_000,
                                     b"a.png,b.png\n" * 3 + b"\x00"])
def test_damaged_pair_csv_is_named(tmp_path, content):
  from tfds_builders.pair_query import pair_query_dataset_builder as pq_builder
  from etils import epath
  path = tmp_path / "queries.csv"
  path.write_bytes(content)
  with pytest.raises(pq_builder.CsvError, match="queries.csv line"):
    list(pq_builder._rows(epath.Path(path)))  # noqa: SLF001


def test_oversized_pair_csv_is_refused_unread(tmp_path, monkeypatch):
  from tfds_builders.pair_query import pair_query_dataset_builder as pq_builder
  from etils import epath
  monkeypatch.setattr(pq_builder, "MAX_CSV_BYTES", 1000)
  path = tmp_path / "queries.csv"
  path.write_bytes(b"a.png,b.png\n" * 200)
  with pytest.raises(pq_builder.CsvError, match="too large for a pair list"):
    list(pq_builder._rows(epath.Path(path)))  # noqa: SLF001


def test_damaged_recorded_pairs_are_named():
  from histojax.data import sources
  sources._check_pairs({"query": [["a", "b"]], "validation": [["a", "b", 1]]}, "x")  # noqa: SLF001
  for bad in ({"query": "ab"}, {"query": [["a"]]}, {"query": [["a", "b"]], "validation": [["a", "b", 7]]}, [1]):
    with pytest.raises(ValueError, match="meta.json: the recorded query pairs are damaged"):
      sources._check_pairs(bad, "meta.json")  # noqa: SLF001


# --- Images at the search entry point ---------------------------------------------------

def test_search_refuses_a_bomb_and_says_how_to_raise_the_limit(tmp_path):
  from histojax import search
  from histojax.data import images
  from tests import image_fixtures
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(image_fixtures.png_bomb())
  import inspect  # noqa: PLC0415
  assert inspect.signature(search.run).parameters["max_pixels"].default == images.DEFAULT_MAX_PIXELS["search"]
  with pytest.raises(images.ImageTooLargeError, match="bomb.png: 20000 x 20000 .* raise the limit .*--max_pixels"):
    search.read_image(str(bomb))
  with pytest.raises(ValueError, match="--max_pixels must be positive"):
    search.run("x", ["y"], max_pixels=0)


@pytest.mark.parametrize("content", [b"", b"{\"kind\": ", b"[1, 2]", b"\xff\xfe garbage", b'{"kind": "x"}'])
def test_damaged_weights_manifest_for_init_from(tmp_path, content):
  from histojax.weights import store
  (tmp_path / "manifest.json").write_bytes(content)
  with pytest.raises(ValueError, match="manifest.json"):
    store.read_manifest(tmp_path)
  assert (tmp_path / "manifest.json").read_bytes() == content


def test_a_damaged_export_staging_manifest_starts_the_export_over(tmp_path):
  from histojax import export
  (tmp_path / "manifest.json").write_bytes(b"{ half a manifest")
  assert export._recorded(tmp_path / "manifest.json") is None  # noqa: SLF001
