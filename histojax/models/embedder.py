"""Backbone + head as one module: uint8 images in, unit-norm embeddings out.

Input normalisation lives here, not in the data pipeline, so training, export
and the search CLI can never disagree about it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

# ImageNet statistics, which published backbones were trained with.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize_images(images, dtype=jnp.float32):
  images = images.astype(jnp.float32)
  return ((images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)).astype(dtype)


class Embedder(nnx.Module):
  def __init__(self, backbone: nnx.Module, head: nnx.Module, *, dtype=jnp.float32):
    self.backbone = backbone
    self.head = head
    self.dtype = dtype

  def features(self, images):
    return self.backbone(normalize_images(images, self.dtype))

  def __call__(self, images):
    return self.head(self.features(images))
