"""The (data, fsdp) mesh and FSDP: layout changes memory, never the math."""

import jax
import numpy as np
import pytest

from histojax import checkpoint, sharding
from histojax import mesh as mesh_lib
from histojax import step as step_lib
from tests.conftest import tiny_config


def _batches(config, n):
  rng = np.random.default_rng(0)
  b, s = config.input.batch_size, config.input.image_size
  labels = np.repeat(np.arange(b // config.input.m_per_class), config.input.m_per_class).astype(np.int32)
  return [{"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "label": labels} for _ in range(n)]


def _train(config, batches):
  """Losses, final state, the state's layout and the compiled step's argument bytes per device."""
  mesh = mesh_lib.make_mesh(config.mesh)
  trainer, state = step_lib.create(config, mesh)
  layout = jax.tree.map(lambda x: x.sharding, state)
  rng = jax.random.key(0)
  compiled = step_lib.jit_train_step(trainer, state).lower(
      state, step_lib.batch_spec(config), jax.eval_shape(lambda: rng)).compile()
  losses = []
  for batch in batches:
    state, metrics = compiled(state, mesh_lib.to_global(batch, mesh), rng)
    losses.append(float(metrics["loss"]))
  return losses, state, layout, compiled.memory_analysis().argument_size_in_bytes


def _smooth_config():
  """The tiny quickstart made smooth in its parameters (see tests/test_multiprocess.py):
  SGD (updates linear in the gradients) and no pair mining (epsilon=2 keeps every
  pair), so that a last-bit difference in how gradients are summed stays a last-bit
  difference instead of an Adam sign flip or a mined pair crossing its threshold."""
  config = tiny_config("")
  config.optimizer.name, config.optimizer.lr, config.optimizer.warmup_steps = "sgd", 0.01, 0
  config.objective.epsilon = 2.0
  return config


@pytest.fixture(scope="module")
def replicated_run(devices):
  config = _smooth_config()
  batches = _batches(config, 3)
  return batches, _train(config, batches)


@pytest.mark.parametrize("data,fsdp", [(4, 2), (1, -1)])
def test_fsdp_trains_like_replicated(replicated_run, data, fsdp):
  """Three steps of the tiny quickstart with params and momentum split over fsdp."""
  batches, (losses_rep, state_rep, _, bytes_rep) = replicated_run
  config = _smooth_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = data, fsdp, 0
  losses_fsdp, state_fsdp, layout, bytes_fsdp = _train(config, batches)

  # The layout really is split, and the step kept it (out_shardings == in_shardings).
  kernel = layout[0]["backbone"]["layer4"][1]["conv2"]["kernel"]
  assert "fsdp" in kernel.spec, kernel.spec
  moment = layout[1]["opt_state"][1][0]["trace"]["backbone"]["layer4"][1]["conv2"]["kernel"]
  assert moment.spec == kernel.spec
  for a, s in zip(jax.tree.leaves(state_fsdp), jax.tree.leaves(layout)):
    assert a.sharding == s
  # The compiled step's arguments (state + batch) shrink with the split.
  fsdp_size = 8 // data
  assert bytes_fsdp < bytes_rep * (1.5 / fsdp_size), (bytes_fsdp, bytes_rep)

  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree.leaves(state_fsdp), jax.tree.leaves(state_rep)))
  print(f"data={data} fsdp={fsdp}: losses {losses_fsdp} vs replicated {losses_rep}; "
        f"max |state difference| {diff:.3g}; step arguments {bytes_fsdp / 2**20:.2f} vs "
        f"{bytes_rep / 2**20:.2f} MiB per device")
  np.testing.assert_allclose(losses_fsdp, losses_rep, rtol=1e-6)
  assert losses_rep[0] != losses_rep[-1]
  # Gradients reach the shards through reduce-scatter instead of all-reduce: the
  # momentum buffers (sums of gradients, with cancellation) show the order at ~1e-6.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_fsdp), jax.tree.leaves(state_rep)):
    atol = 1e-6 if path[0].key == 0 else 1e-5
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_rules_choose_by_path(devices):
  config = tiny_config("")
  config.mesh.fsdp = 4
  config.mesh.rules = ((r"head/", "replicate"), (r"kernel$", "fsdp"))
  config.mesh.fsdp_min_size = 2000
  _, state = step_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  specs = {sharding.path_str(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state)}
  P = jax.sharding.PartitionSpec
  assert specs["0/head/proj/kernel"] == P()  # the first matching rule wins
  assert specs["1/opt_state/0/nu/head/proj/kernel"] == P()
  conv = "0/backbone/layer4/1/conv2/kernel"  # (3, 3, 64, 64): the later of the equal dims
  assert specs[conv] == P(None, None, None, "fsdp")
  assert specs["1/opt_state/0/mu/backbone/layer4/1/conv2/kernel"] == specs[conv]  # moments follow
  assert specs["0/backbone/layer4/1/bn2/scale"] == P()  # no rule matches
  assert specs["0/backbone/conv1/kernel"] == P()  # 7x7x3x8 = 1176 elements, under the threshold


def test_fsdp_spec_picks_a_dimension_that_divides():
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((3, 3, 64, 128), 4, 0) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((512, 30), 4, 0) == P("fsdp")
  assert sharding.fsdp_spec((30, 7), 4, 0) == P()  # nothing divides: replicated
  assert sharding.fsdp_spec((64, 64), 4, 10_000) == P()  # below the size threshold
  assert sharding.fsdp_spec((64, 64), 1, 0) == P()


@pytest.mark.parametrize("rules,message", [
    ((("kernel", "shard"),), r"mesh.rules\[0\] strategy must be one of"),
    ((("(", "fsdp"),), r"mesh.rules\[0\] regex '\(' does not compile"),
    ((".*",), r"mesh.rules\[0\] must be a \(regex, strategy\) pair"),
])
def test_bad_rules_name_the_entry(rules, message):
  config = tiny_config("")
  config.mesh.rules = rules
  with pytest.raises(ValueError, match=message):
    sharding.compile_rules(config.mesh)


@pytest.mark.parametrize("data,fsdp,expected", [
    (-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (1, 8, (1, 8)), (8, 1, (8, 1))])
def test_axis_sizes(data, fsdp, expected):
  config = tiny_config("")
  config.mesh.data, config.mesh.fsdp = data, fsdp
  assert mesh_lib.axis_sizes(config.mesh, 8) == expected


@pytest.mark.parametrize("data,fsdp,message", [
    (1, 3, r"mesh.data=1 x mesh.fsdp=3 = 3 devices, but 8 devices are available"),
    (-1, 3, r"mesh.fsdp=3 does not divide the 8 available devices"),
    (-1, -1, r"mesh.data and mesh.fsdp are both -1"),
    (0, 1, r"mesh.data must be a positive device count or -1"),
    (-1, -2, r"mesh.fsdp must be a positive device count or -1"),
])
def test_bad_mesh_names_the_field(data, fsdp, message):
  config = tiny_config("")
  config.mesh.data, config.mesh.fsdp = data, fsdp
  with pytest.raises(ValueError, match=message):
    mesh_lib.axis_sizes(config.mesh, 8)


def test_batch_that_does_not_divide_names_the_mesh(devices):
  config = tiny_config("")
  config.mesh.fsdp = 2
  mesh = mesh_lib.make_mesh(config.mesh)
  with pytest.raises(ValueError, match=r"input.batch_size=20 does not divide over 8 devices "
                                       r"\(mesh data=4 x fsdp=2\); use a multiple of 8"):
    mesh_lib.local_batch_size(20, mesh)


def test_checkpoint_moves_between_layouts(tmp_path, replicated_run):
  """Saved replicated, restored split over fsdp=8 (and back): values identical."""
  _, (_, state, _, _) = replicated_run
  config = _smooth_config()
  mngr = checkpoint.manager(tmp_path, config.checkpoint)
  assert checkpoint.save(mngr, 3, state, {"next_index": 3}, force=True)
  mngr.wait_until_finished()

  config.mesh.fsdp, config.mesh.fsdp_min_size = 8, 0
  _, split_like = step_lib.abstract_state(config, mesh_lib.make_mesh(config.mesh))
  split, _ = checkpoint.restore(mngr, 3, split_like)
  assert any("fsdp" in a.sharding.spec for a in jax.tree.leaves(split))
  for a, b, like in zip(jax.tree.leaves(split), jax.tree.leaves(state), jax.tree.leaves(split_like)):
    assert a.sharding == like.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  assert checkpoint.save(mngr, 4, split, {"next_index": 4}, force=True)
  mngr.wait_until_finished()
  replicated, _ = checkpoint.restore(mngr, 4, state)
  mngr.close()
  for a, b in zip(jax.tree.leaves(replicated), jax.tree.leaves(state)):
    assert a.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
