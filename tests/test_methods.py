"""Every objective trains over the mesh: 8 devices = 1 device, and the loss falls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import pq
from histojax import step as step_lib
from histojax.data import images as images_lib, sources
from histojax.objectives import byol

# (objective, model, head, model/head overrides)
METHODS = {
    "multi_similarity": ("resnet", None, {"embed_dim": 32}),
    "contrastive": ("resnet", None, {"embed_dim": 32}),
    "triplet": ("resnet", None, {"embed_dim": 32}),
    "abe": ("abe", None, {"embed_dim": 32, "num_learners": 2}),
    "cgd": ("resnet", "cgd", {"embed_dim": 48, "head.num_classes": 6}),
    "byol": ("resnet", "byol", {"embed_dim": 0, "head.projector_hidden": 64, "head.projector_dim": 16,
                                "head.predictor_hidden": 64, "head.probe_classes": 6}),
    "spq": ("resnet", None, {"embed_dim": 32}),
}


def method_config(objective):
  model, head, overrides = METHODS[objective]
  c = config_lib.base_config(model=model, objective=objective, head=head)
  c.model.depth, c.model.width = 18, 0.125
  c.input.image_size, c.input.batch_size, c.input.m_per_class = 32, 24, 4
  c.total_steps, c.seed = 20, 0
  c.optimizer.name, c.optimizer.lr, c.optimizer.warmup_steps = "sgd", 0.05, 0
  if objective == "spq":
    c.objective.codebook_size = 16
  for dotted, value in overrides.items():
    node, *path = c.model, *dotted.split(".")
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
  return c


@pytest.fixture(scope="module")
def tissue_batches(tiny_data_dir):
  """Two fixed batches of real (synthetic) tissue: 6 classes x 4 patches."""
  source = sources.open_split("synthetic_tissue/tiny", "train", tiny_data_dir)
  labels = sources.read_metadata(source)["label"]
  idx = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(6)])
  images = np.stack([images_lib.decode_example(source[int(i)]["image"]) for i in idx])
  crops = [images[:, 8:40, 8:40], images[:, 20:52, 16:48]]
  return crops, labels[idx].astype(np.int32)


def _batch(objective, crops, labels):
  views = 2 if objective in ("byol", "spq") else 1
  if views == 1:
    return {"image": crops[0], "label": labels}
  return {"view1": crops[0], "view2": crops[1], "label": labels}


def _train(config, devices, batch, steps, snapshot_at=2):
  """Losses of `steps` steps, and the parameters (on host) after `snapshot_at` steps."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer, state = step_lib.create(config, mesh)
  train_step = step_lib.jit_train_step(trainer, state)
  losses, snapshot = [], None
  for i in range(steps):
    state, metrics = train_step(state, mesh_lib.to_global(batch, mesh), jax.random.key(1))
    losses.append(float(metrics["loss"]))
    if i + 1 == snapshot_at:
      snapshot = jax.tree.map(np.asarray, nnx.state(nnx.merge(trainer.graphdef, state)[0], nnx.Param))
  return losses, snapshot


@pytest.mark.parametrize("objective", sorted(METHODS))
def test_method_is_mesh_invariant_and_learns(objective, devices, tissue_batches):
  config = method_config(objective)
  batch = _batch(objective, *tissue_batches)
  # The parameters are compared after one update: that update is where a
  # per-device loss (negatives from one shard only) would show, off by the
  # update itself (~1e-3). From the second step on, the 1e-7 summation-order
  # noise of the two meshes can move a pair across a mining threshold (MS
  # epsilon, contrastive margin, ABE's hinge) and the parameters part by ~1e-3
  # for a legitimate reason. The second loss, on the updated parameters, is
  # continuous enough to compare; later steps only check that learning happens.
  losses8, params8 = _train(config, devices, batch, steps=5, snapshot_at=1)
  losses1, params1 = _train(config, devices[:1], batch, steps=2, snapshot_at=1)
  np.testing.assert_allclose(losses8[:2], losses1, rtol=1e-4, atol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params8), jax.tree.leaves(params1)):
    # atol: parameters carry ~1e-6 of summation-order noise after one step.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert losses8[-1] < losses8[0], f"{objective} loss did not fall: {losses8}"


def test_byol_target_is_the_scheduled_ema_and_gets_no_gradient(devices, tissue_batches):
  config = method_config("byol")
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  trainer, state = step_lib.create(config, mesh)
  model = nnx.merge(trainer.graphdef, state)[0]
  online0 = jax.tree.map(np.asarray, nnx.state(model.online, nnx.Param))
  target0 = jax.tree.map(np.asarray, nnx.state(model.target, nnx.Param))
  for a, b in zip(jax.tree.leaves(online0), jax.tree.leaves(target0)):
    np.testing.assert_array_equal(a, b)  # the target starts as a copy
  # The optimizer holds no moments for the target: it is not trainable.
  assert not any("target" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state[1]))

  batch = _batch("byol", *tissue_batches)
  state, _ = step_lib.jit_train_step(trainer, state)(state, mesh_lib.to_global(batch, mesh), jax.random.key(0))
  model = nnx.merge(trainer.graphdef, state)[0]
  online1 = nnx.state(model.online, nnx.Param)
  target1 = nnx.state(model.target, nnx.Param)
  tau = float(byol.target_decay(1, config.total_steps, config.objective.base_decay))
  assert 0.996 < tau < 1.0
  moved = 0
  for (path, o1), t0, t1 in zip(jax.tree_util.tree_leaves_with_path(online1), jax.tree.leaves(target0),
                                jax.tree.leaves(target1)):
    np.testing.assert_allclose(np.asarray(t1), tau * t0 + (1 - tau) * np.asarray(o1), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
    moved += int(not np.allclose(np.asarray(o1), t0))
  assert moved > 0  # the online network did move, so the check above is not trivial


def test_spq_codes_shape_and_bits(devices, tissue_batches):
  config = method_config("spq")
  mesh = mesh_lib.make_mesh(config.mesh, devices[:1])
  trainer, state = step_lib.create(config, mesh)
  model = nnx.merge(trainer.graphdef, state)[0]
  model.eval()
  books, metric = trainer.objective.codebooks(model)  # the PQ hook export reads
  embeddings = np.asarray(model(jnp.asarray(tissue_batches[0][0])))
  codes = pq.encode(embeddings, np.asarray(books), metric)
  assert codes.shape == (24, 4) and np.issubdtype(codes.dtype, np.integer)
  assert model.quantizer.bits == 4 * 4  # 4 codebooks of 16 codewords
  assert int(codes.max()) < 16


def test_method_requirements_are_named():
  config = method_config("cgd")
  config.model.head.num_classes = 0
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  trainer, state = step_lib.create(config, mesh)
  with pytest.raises(ValueError, match="num_classes"):
    step_lib.jit_train_step(trainer, state)(
        state, mesh_lib.to_global({"image": np.zeros((24, 32, 32, 3), np.uint8),
                                   "label": np.zeros(24, np.int32)}, mesh), jax.random.key(0))
  byol_on_linear = config_lib.base_config(objective="byol")
  with pytest.raises(ValueError, match="head='byol'"):
    step_lib.create(byol_on_linear, mesh)
