"""The model zoo: published parameter counts, forward shapes and dtypes, heads, config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from histojax import config as config_lib
from histojax import mesh as mesh_lib
from histojax import models
from histojax.config import base_config
from histojax.models import heads, resnet


def _count(cfg) -> int:
  return models.parameter_count(models.abstract_model(cfg).backbone)


@pytest.mark.parametrize("depth,published", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                                             (101, 44_549_160)])
def test_resnet_parameter_count_matches_torchvision(depth, published):
  # torchvision counts include the 1000-way classifier (features*1000 + 1000).
  cfg = models.model_config("resnet")
  cfg.depth = depth
  features = 512 if depth < 50 else 2048
  assert _count(cfg) + features * 1000 + 1000 == published


# Published counts without classifier: timm `seresnet50` / `vit_*` with num_classes=0,
# open_clip `model.visual`, and the reference's mixed-attention model with its 512-d head.
PUBLISHED = {
    "se_resnet": 26_039_024,
    "clip_vit_b32": 87_849_216,
    "clip_vit_b16": 86_192_640,
    "clip_vit_l14": 303_966_208,
    "vit_b16": 85_798_656,
    "vit_l16": 303_301_632,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_backbone_parameter_count_matches_published(name):
  assert _count(models.model_config(name)) == PUBLISHED[name]


def test_mixed_attention_matches_reference_count():
  # Reference (Yang et al.) SE-ResNet-50 + mask branch + linear 512: 45,731,440 in torch.
  model = models.abstract_model(models.model_config("mixed_attention"))
  assert models.parameter_count(model) == 45_731_440
  assert models.parameter_count(model.head) == 2048 * 512 + 512


def test_uni_layer_scale_count():
  # UNI: timm vit_large_patch16_224 with init_values=1e-5, num_classes=0.
  cfg = models.model_config("vit_l16")
  cfg.layer_scale = 1e-5
  assert _count(cfg) == 303_350_784


def test_abe_structure_count():
  # Trunk ResNet-50 without fc, a stride-1 copy of stage 4 as the attention body,
  # M stacked 1x1 convs (+BN) back to stage 3's width, M linear embeddings of 512/M.
  cfg = models.model_config("abe")
  model = models.abstract_model(cfg)
  trunk = 25_557_032 - 2048 * 1000 - 1000
  stage4 = 14_964_736
  m = cfg.num_learners
  masks = 2048 * 1024 * m + 2 * 1024 * m
  assert models.parameter_count(model.backbone) == trunk + stage4 + masks
  assert models.parameter_count(model.head) == m * (2048 * 512 // m + 512 // m)


def tiny_config(name, head=None, dtype="float32", depth=None):
  """Registered model `name` at a test width (and optionally depth), same structure."""
  cfg = models.model_config(name, head)
  if "depth" in cfg:
    cfg.width = 1 / 16
    cfg.depth = depth or cfg.depth
  else:
    cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim = 32, 2, 2, 64
    cfg.image_size = 2 * cfg.patch
    if "proj_dim" in cfg:
      cfg.proj_dim = 16
  if cfg.embed_dim:
    cfg.embed_dim = 16
  cfg.dtype = dtype
  return cfg


def random_values(abstract_module, seed=0):
  """A module with numpy-random values in place of its initialisers' (scaled by fan-in,
  positive norm scales and variances). JAX's per-shape RNG compilation would dominate
  these small CPU tests; the real initialisers run in test_forward_gives_unit_embeddings."""
  graphdef, state = nnx.split(abstract_module)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if str(path[-1]) in ("var", "scale", "gamma"):
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 100
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)
  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def random_model(cfg, seed=0):
  return random_values(models.abstract_model(cfg), seed)


def _images(n, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)), jnp.uint8)


def _jit_outputs(model, images):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, x: nnx.merge(graphdef, s).outputs(x))(state, images)


@pytest.mark.parametrize("name", models.MODELS.names())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_model_output_shapes_and_dtypes(name, dtype):
  # Shapes and dtypes need tracing only; values are checked below and in test_numerics.
  # Full depths are built (abstractly) by the count tests; bottleneck + SE blocks here.
  cfg = tiny_config(name, dtype=dtype, depth=50 if name == "se_resnet" else 18)
  model = models.abstract_model(cfg)
  size = cfg.get("image_size", 64)
  out = nnx.eval_shape(lambda m: m.outputs(jnp.zeros((3, size, size, 3), jnp.uint8)), model)
  assert out["embedding"].shape == (3, cfg.embed_dim or model.backbone.num_features)
  assert out["embedding"].dtype == jnp.float32  # normalised in fp32 whatever the compute dtype
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", ["resnet", "clip_vit_b16"])
def test_forward_gives_unit_embeddings_in_bf16(name):
  cfg = tiny_config(name, dtype="bfloat16", depth=18)
  size = cfg.get("image_size", 64)
  emb = _jit_outputs(models.build_model(cfg), _images(3, size))["embedding"]
  assert emb.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(emb)))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, rtol=1e-5)


def test_abe_exposes_unit_learners_whose_concatenation_is_the_embedding():
  cfg = tiny_config("abe", depth=18)
  model = random_model(cfg)
  out = _jit_outputs(model, jnp.full((2, 64, 64, 3), 128, jnp.uint8).at[1].set(7))
  learners = np.asarray(out["learners"])
  assert learners.shape == (2, cfg.num_learners, cfg.embed_dim // cfg.num_learners)
  np.testing.assert_allclose(np.linalg.norm(learners, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["embedding"]),
                             learners.reshape(2, -1) / np.sqrt(cfg.num_learners), rtol=1e-6)
  # Learners differ: their masks and embeddings are their own.
  assert not np.allclose(learners[:, 0], learners[:, 1])


def test_cgd_head_descriptors_and_aux_logits():
  cfg = tiny_config("resnet", head="cgd", depth=18)
  cfg.embed_dim, cfg.head.descriptors, cfg.head.num_classes, cfg.last_stride = 12, "GS", 5, 1
  model = random_model(cfg)
  out = _jit_outputs(model, jnp.zeros((2, 64, 64, 3), jnp.uint8).at[0].set(200))
  assert out["aux_logits"].shape == (2, 5)
  assert [d.shape for d in out["descriptors"]] == [(2, 6), (2, 6)]
  concat = np.concatenate([np.asarray(d) for d in out["descriptors"]], axis=1)
  np.testing.assert_allclose(np.asarray(out["embedding"]), concat / np.linalg.norm(concat, axis=1, keepdims=True),
                             rtol=1e-5)


def test_cgd_learnable_gem_p_receives_a_gradient():
  head = random_values(nnx.eval_shape(lambda: heads.CGDHead(8, 6, descriptors="GM", gem_learnable=True,
                                                           rngs=nnx.Rngs(0))))
  fmap = jax.random.uniform(jax.random.key(0), (2, 3, 3, 8))
  grads = nnx.grad(lambda h: jnp.sum(h(fmap)[:, 0]))(head)
  assert float(jnp.abs(grads.gem_p[...])) > 0


def test_cgd_descriptor_norm_centres_non_negative_features():
  # Pooled ReLU features share one large mean (here every value in [1, 2]): a bias-free FC maps
  # every image near one direction; standardising each descriptor first spreads them.
  rng = np.random.default_rng(0)
  fmap = jnp.asarray(1.0 + rng.random((64, 3, 3, 16)), jnp.float32)
  spread = lambda e: float(np.linalg.norm(np.asarray(e).mean(0)))
  plain = heads.CGDHead(16, 12, descriptors="SMG", descriptor_norm="none", rngs=nnx.Rngs(0))
  centred = heads.CGDHead(16, 12, descriptors="SMG", descriptor_norm="batch_norm", rngs=nnx.Rngs(0))
  assert spread(plain(fmap)) > 0.95
  assert spread(centred(fmap)) < 0.3  # train mode: the batch's statistics
  # Eval mode uses the running statistics: set to this batch's, the embedding is the same.
  for kind, norm in zip(centred.descriptors, centred.norms):
    g = centred.pool(kind, fmap)
    norm.mean[...], norm.var[...] = jnp.mean(g, 0), jnp.var(g, 0)
  train_mode = centred(fmap)
  centred.eval()
  # (Flax takes the batch variance as E[x^2] - E[x]^2: float32 rounding, hence the tolerance.)
  np.testing.assert_allclose(np.asarray(centred(fmap)), np.asarray(train_mode), atol=5e-4)
  # "none" is the original head, parameter for parameter (its checkpoints restore as they were).
  assert plain.norms is None and "norms" not in nnx.state(plain)
  assert set(nnx.state(centred, nnx.Param).keys()) == set(nnx.state(plain, nnx.Param).keys())
  with pytest.raises(ValueError, match="descriptor_norm must be one of"):
    heads.CGDHead(16, 12, descriptor_norm="layer", rngs=nnx.Rngs(0))


def test_cgd_configs_written_before_descriptor_norm_keep_the_original_head(tmp_path):
  config = base_config(model="resnet", objective="cgd", head="cgd")
  assert config.model.head.descriptor_norm == "batch_norm"  # new runs centre
  assert models.identity(config.model)["head"]["descriptor_norm"] == "batch_norm"
  raw = json.loads(config.to_json_best_effort())
  del raw["model"]["head"]["descriptor_norm"]  # as every run before the field wrote it
  (tmp_path / "config.json").write_text(json.dumps(raw))
  old = config_lib.load(tmp_path / "config.json")
  assert old.model.head.descriptor_norm == "none"
  # ... and its identity is what its exports and indexes recorded, so they still match.
  assert models.identity(old.model) == raw["model"]


def test_last_stride_one_keeps_stage4_resolution():
  for last_stride, side in ((2, 2), (1, 4)):
    model = nnx.eval_shape(lambda s=last_stride: resnet.ResNet(18, 1 / 16, last_stride=s, rngs=nnx.Rngs(0)))
    fmap = nnx.eval_shape(lambda m: m(jnp.zeros((1, 64, 64, 3))), model)
    assert fmap.shape == (1, side, side, 32)


def test_byol_head_outputs_and_target_projection():
  cfg = tiny_config("resnet", head="byol", depth=18)
  cfg.embed_dim = 0
  cfg.head.update(projector_hidden=32, projector_dim=8, predictor_hidden=16, probe_classes=3)
  model = random_model(cfg)
  out = _jit_outputs(model, jnp.zeros((2, 64, 64, 3), jnp.uint8))
  assert out["projection"].shape == out["prediction"].shape == (2, 8)
  assert out["probe_logits"].shape == (2, 3)
  assert out["embedding"].shape == (2, model.backbone.num_features)
  assert model.head.project(out["features"]).shape == (2, 8)


def test_vit_accepts_other_input_sizes_by_resampling_positions():
  cfg = tiny_config("vit_b16")  # native 32 px = 2x2 patches of 16
  model = random_model(cfg)
  emb = model(_images(1, 64)[:, :, :48])
  assert emb.shape == (1, 32) and np.all(np.isfinite(np.asarray(emb)))
  with pytest.raises(ValueError, match="not a multiple of model.patch"):
    model(jnp.zeros((1, 40, 40, 3), jnp.uint8))


@pytest.mark.parametrize("name,head,field,value,match", [
    ("resnet", "cgd", "head.descriptors", "SX", "model.head.descriptors"),
    ("resnet", "cgd", "embed_dim", 10, r"model.embed_dim \(10\) must be a positive multiple"),
    ("resnet", "byol", "embed_dim", 64, "model.embed_dim must be 0 with the byol head"),
    ("abe", None, "embed_dim", 10, r"multiple of model.num_learners \(4\)"),
    ("resnet", None, "depth", 20, "model.depth must be one of"),
    ("clip_vit_b16", None, "heads", 5, r"model.width \(32\) must be divisible by model.heads \(5\)"),
    ("vit_b16", None, "pool", "max", "model.pool must be one of"),
    ("resnet", None, "input_norm", "imagenette", "model.input_norm must be one of"),
    ("resnet", None, "dtype", "float16", "model.dtype must be one of"),
])
def test_bad_model_config_names_the_field(name, head, field, value, match):
  cfg = tiny_config(name, head)
  if head == "byol":
    cfg.embed_dim = 0
  node, leaf = (cfg.head, field.split(".")[1]) if field.startswith("head.") else (cfg, field)
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    models.abstract_model(cfg)


def test_switching_head_name_alone_is_refused():
  cfg = tiny_config("resnet")
  cfg.head.name = "cgd"
  with pytest.raises(ValueError, match=r"head 'cgd' takes .*base_config\(model='resnet', head='cgd'\)"):
    models.abstract_model(cfg)


def test_cgd_head_refuses_a_vit():
  cfg = tiny_config("vit_b16", head="cgd")
  cfg.embed_dim = 6
  with pytest.raises(ValueError, match="the cgd head pools a convolutional feature map"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 32, 32, 3), jnp.uint8)), models.abstract_model(cfg))


def test_base_config_picks_head_and_locks_its_fields(tmp_path):
  config = base_config(model="resnet", head="cgd")
  assert config.model.head.descriptors == "SMG"
  config.model.head.descriptors = "GM"
  config_lib.save(config, tmp_path / "config.json")  # what evaluate reads back
  assert config_lib.load(tmp_path / "config.json").to_dict() == config.to_dict()
  with pytest.raises(AttributeError, match="num_clases"):
    config.model.head.num_clases = 3
  with pytest.raises(ValueError, match="model 'abe' has its own head"):
    base_config(model="abe", head="cgd")


def test_batch_norm_uses_global_batch_statistics(devices):
  """Train-mode forward of a BN model on an 8-way sharded batch equals the unsharded one."""
  cfg = tiny_config("mixed_attention", head="cgd", depth=18)
  cfg.embed_dim, cfg.head.num_classes = 12, 3
  images = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)

  def run(devs):
    model = random_model(cfg)
    model.train()
    mesh = mesh_lib.make_mesh(base_config().mesh, devs)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, mesh_lib.replicated(mesh))
    x = mesh_lib.to_global({"image": images}, mesh)["image"]

    @jax.jit
    def forward(s, x):
      m = nnx.merge(graphdef, s)
      out = m.outputs(x)
      return out["embedding"], out["aux_logits"], nnx.state(m, nnx.BatchStat)
    return jax.tree.map(np.asarray, forward(state, x))

  sharded, single = run(devices), run(devices[:1])
  # Per-device statistics (2 images each) would change these at order 1, not 1e-4.
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
