"""Backbones: published parameter counts and forward shapes."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from histojax import models
from histojax.models import resnet


def _count(module):
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("depth,published", [(18, 11_689_512), (50, 25_557_032)])
def test_resnet_parameter_count_matches_torchvision(depth, published):
  # torchvision counts include the 1000-way classifier (features*1000 + 1000).
  backbone = resnet.ResNet(depth, rngs=nnx.Rngs(0))
  assert _count(backbone) + backbone.num_features * 1000 + 1000 == published


def test_embedder_forward_shape_and_norm():
  cfg = models.MODELS.defaults("resnet")
  cfg.depth, cfg.width, cfg.embed_dim = 18, 0.125, 24
  model = models.build_model(cfg)
  emb = model(jnp.zeros((3, 40, 40, 3), jnp.uint8))
  assert emb.shape == (3, 24) and emb.dtype == jnp.float32
  assert jnp.allclose(jnp.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_unknown_depth_names_the_field():
  with pytest.raises(ValueError, match="model.depth"):
    resnet.ResNet(20, rngs=nnx.Rngs(0))
