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
