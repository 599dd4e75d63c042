"""Training end to end: checkpoints, exact resume, and the shrunk quickstart."""

import json

import jax
import numpy as np
import pytest

from histojax import checkpoint, train
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from tests.conftest import tiny_config


def _final_state(config, workdir):
  mngr = checkpoint.manager(workdir, config.checkpoint)
  _, like = step_lib.create(config, mesh_lib.make_mesh(config.mesh))
  state, data_state = checkpoint.restore(mngr, mngr.latest_step(), like)
  mngr.close()
  return jax.tree.map(np.asarray, state), data_state


def test_checkpoint_roundtrip_is_exact(tmp_path, tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  mesh = mesh_lib.make_mesh(config.mesh)
  _, state = step_lib.create(config, mesh)
  state = jax.tree.map(lambda x: x + 0.125 if x.dtype == np.float32 else x, state)
  mngr = checkpoint.manager(tmp_path, config.checkpoint)
  assert checkpoint.save(mngr, 7, state, {"next_index": 3}, force=True)
  mngr.wait_until_finished()
  _, blank = step_lib.create(config, mesh)
  restored, data_state = checkpoint.restore(mngr, 7, blank)
  mngr.close()
  assert data_state == {"next_index": 3}
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding


def test_stop_and_resume_equals_uninterrupted(tmp_path, tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  config.total_steps = 6
  config.checkpoint.every_steps = 100  # only the forced saves at stops
  config.eval.at_end = False
  config.eval.every_steps = 2  # evaluation during training: the same rows before and after the stop
  config.eval.during.gallery_rows, config.eval.during.query_rows = 20, 10  # of 48 and 48: a real draw

  train.train_and_evaluate(config, tmp_path / "straight")
  assert train.train_and_evaluate(config, tmp_path / "resumed", stop_at=3) == {}
  assert _final_state(config, tmp_path / "resumed")[1] == {"next_index": 3}
  train.train_and_evaluate(config, tmp_path / "resumed")

  straight, data_straight = _final_state(config, tmp_path / "straight")
  resumed, data_resumed = _final_state(config, tmp_path / "resumed")
  assert data_straight == data_resumed == {"next_index": 6}
  assert int(straight[1]["step"]) == 6
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

  scored = {run: _during_rows(tmp_path / run) for run in ("straight", "resumed")}
  assert [row["step"] for row in scored["straight"]] == [2, 4, 6]  # at_end off: the last step too
  for row in scored["straight"]:
    assert {f"during/{m}@{k}" for m in ("precision", "map", "majority_vote") for k in config.eval.ks} <= set(row)
    assert all(0.0 <= v <= 1.0 for name, v in row.items() if name.startswith("during/") and "@" in name), row
  # Step 2 was scored before the stop at 3, steps 4 and 6 after it: equal numbers, so the same rows.
  assert scored["resumed"] == scored["straight"]


def _during_rows(workdir):
  """The evaluation-during-training rows of train_metrics.jsonl, without their (varying) seconds."""
  rows = [json.loads(line) for line in (workdir / "train_metrics.jsonl").read_text().splitlines()]
  for row in rows:
    assert ("loss" in row) != ("during/seconds" in row), row  # a training row or an evaluation row
    assert ("steps_per_sec" in row) == ("loss" in row), row  # the rate is training's alone
  return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in rows if "during/seconds" in row]


def test_quickstart_tiny_end_to_end(tmp_path, tiny_data_dir, capsys):
  config = tiny_config(tiny_data_dir)
  results = train.train_and_evaluate(config, tmp_path)

  written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert written == results
  for name in ("precision@5", "map@10", "majority_vote@5", "accuracy@1"):
    assert 0.0 <= written[name] <= 1.0, name
  assert written["step"] == config.total_steps
  assert written["num_query"] == written["num_gallery"] == 48  # tiny: 6 classes x 2 images x 4 tiles
  assert (tmp_path / "index" / "manifest.json").exists()
  assert (tmp_path / "export" / "test" / "embeddings.npy").exists()
  assert list((tmp_path / "tensorboard").iterdir())
  logged = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in logged] == [2, 4] and all("loss" in row for row in logged)
  assert "precision" in capsys.readouterr().out

  # The same command again reports the finished run instead of training.
  mtime = (tmp_path / "eval" / "metrics.json").stat().st_mtime_ns
  again = train.train_and_evaluate(config, tmp_path)
  assert again == results
  assert (tmp_path / "eval" / "metrics.json").stat().st_mtime_ns == mtime


def test_missing_dataset_names_the_command(tmp_path):
  config = tiny_config(str(tmp_path / "empty_tfds"))
  with pytest.raises(FileNotFoundError, match="python -m histojax.prepare --dataset synthetic_tissue/tiny"):
    train.train_and_evaluate(config, tmp_path / "work")
