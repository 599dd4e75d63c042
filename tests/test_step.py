"""The jitted train step over the mesh: data parallelism must not change the math."""

import dataclasses

import jax
import numpy as np
import pytest

from histojax import mesh as mesh_lib
from histojax import step as step_lib
from tests.conftest import tiny_config


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s = config.input.batch_size, config.input.image_size
  return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
          "label": np.repeat(np.arange(b // config.input.m_per_class), config.input.m_per_class).astype(np.int32)}


def _run(config, devices, batches):
  """Losses of every step, and the state after the first update."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer, state = step_lib.create(config, mesh)
  train_step = step_lib.jit_train_step(trainer, state)
  rng = jax.random.key(0)
  losses, first = [], None
  for batch in batches:
    state, metrics = train_step(state, mesh_lib.to_global(batch, mesh), rng)
    losses.append(float(metrics["loss"]))
    first = jax.tree.map(np.asarray, state) if first is None else first
  return losses, first


def test_eight_devices_equal_one_device(devices):
  config = tiny_config("")
  # SGD: updates are linear in the gradients, so this compares the gradients
  # themselves. (Adam divides by sqrt(v) and would amplify summation-order
  # noise in near-zero gradients into visible parameter differences.)
  config.optimizer.name = "sgd"
  config.optimizer.lr = 0.1
  config.optimizer.warmup_steps = 0  # a real update from the first step
  # No pair mining: with MS's epsilon, 1e-7 summation-order noise between the
  # meshes can move a pair across the mining threshold at step 2 and change the
  # loss by ~1e-4 for a legitimate reason (measured on this project's CPU).
  config.objective.epsilon = 1e3
  batches = [_batch(config, seed) for seed in range(2)]
  losses8, state8 = _run(config, devices, batches)
  losses1, state1 = _run(config, devices[:1], batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert losses8[1] != losses8[0]  # the first update changed something
  # Parameters, batch-norm statistics and the momentum (the first gradient)
  # after one update, each leaf to 1% of its own largest value. A per-device
  # statistic or loss would move nearly every value by the size of the gradient
  # itself. What the two meshes (per-device batch 3 against 24) legitimately
  # differ by, measured on this project's 2-core CPU on random pixels: up to
  # 0.4% of the largest conv1 gradient (small sums of large, cancelling terms),
  # and a handful of values (3 of 36,864 in layer4's conv2) where an activation
  # within rounding of zero falls on the other side of a ReLU. So at most 0.1%
  # of a leaf's values may fall outside the tolerance.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state8), jax.tree.leaves(state1)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    far = np.abs(a - b) > 1e-6 + 1e-2 * (float(np.max(np.abs(b))) if b.size else 0.0)
    assert np.mean(far) <= 1e-3 if far.size else True, (
        f"{jax.tree_util.keystr(path)}: {int(far.sum())} of {far.size} values differ; max |diff| "
        f"{float(np.max(np.abs(a - b))):.3g}")


def test_metrics_carry_loss_and_norms(devices):
  config = tiny_config("")
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer, state = step_lib.create(config, mesh)
  state, metrics = step_lib.jit_train_step(trainer, state)(
      state, mesh_lib.to_global(_batch(config), mesh), jax.random.key(0))
  for name in ("loss", "grad_norm", "param_norm", "lr"):
    assert np.isfinite(float(metrics[name])), name
  assert step_lib.step_of(state) == 1


def test_batch_that_does_not_divide_fails_early(devices):
  config = tiny_config("")
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  with pytest.raises(ValueError, match="input.batch_size=12 does not divide over 8 devices"):
    mesh_lib.local_batch_size(12, mesh)


def test_bf16_compute_keeps_fp32_params(devices):
  config = tiny_config("")
  config.model.dtype = "bfloat16"
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer, state = step_lib.create(config, mesh)
  params = jax.tree.leaves(state[0])
  assert all(p.dtype in (np.float32, np.uint32) for p in params)
  emb = step_lib.jit_embed(trainer)(state, mesh_lib.to_global(_batch(config), mesh)["image"])
  assert emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, rtol=1e-3)


def test_d8_embedding_does_not_move_with_orientation(devices):
  config = tiny_config("")
  mesh = mesh_lib.make_mesh(config.mesh, devices[:1])
  trainer, state = step_lib.create(config, mesh)
  images = _batch(config)["image"]
  turned = np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2))[:, :, ::-1])  # a rotation and a flip
  plain = step_lib.jit_embed(trainer)
  single = np.asarray(plain(state, images)), np.asarray(plain(state, turned))
  assert np.abs(single[0] - single[1]).max() > 1e-3  # one view's embedding does move
  d8 = step_lib.jit_embed(dataclasses.replace(trainer, tta="d8"))
  averaged = np.asarray(d8(state, images)), np.asarray(d8(state, turned))
  np.testing.assert_allclose(averaged[0], averaged[1], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(averaged[0], axis=1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="eval.tta must be one of"):
    step_lib.jit_embed(dataclasses.replace(trainer, tta="d4"))(state, images)


def test_create_builds_once_and_the_abstract_trainer_builds_nothing(monkeypatch):
  config = tiny_config("")
  config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 0
  mesh = mesh_lib.make_mesh(config.mesh)
  calls = []
  real = step_lib._builder  # noqa: SLF001
  monkeypatch.setattr(step_lib, "_builder", lambda c: calls.append(1) or real(c))
  trainer, state = step_lib.create(config, mesh)
  assert len(calls) == 1  # one objective, one optimizer, one build: not a second pass for the layout
  abstract_trainer, abstract = step_lib.abstract_trainer(config, mesh)
  leaves = jax.tree.leaves(abstract)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # no array was made
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abstract) == \
      jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), state)
  assert abstract_trainer.state_sharding == trainer.state_sharding
  assert type(abstract_trainer.objective) is type(trainer.objective)
