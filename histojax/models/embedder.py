"""Backbone + head as one module: uint8 images in, unit-norm embeddings out.

Input normalisation lives here, not in the data pipeline, so training, export
and the search CLI can never disagree about it. Each published family was
trained with its own statistics (`model.input_norm`), and imported weights
only reproduce their features under those.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

# Per-channel (mean, std) on the 0..1 scale.
INPUT_NORMS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision, timm, UNI
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP, open_clip
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # timm's augreg ViTs: [-1, 1]
    # Pathology foundation models (models.presets), from their model cards / TRIDENT's constants.
    "kaiko": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # kaiko.ai's ViTs and Midnight
    "h_optimus": ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),  # H-optimus-0/1
    "hibou": ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816)),  # Hibou-B/L preprocessor_config.json
}
IMAGENET_MEAN = tuple(255 * m for m in INPUT_NORMS["imagenet"][0])
IMAGENET_STD = tuple(255 * s for s in INPUT_NORMS["imagenet"][1])


def input_stats(name: str):
  """(mean, std) on the 0..255 scale for `model.input_norm`."""
  if name not in INPUT_NORMS:
    raise ValueError(f"model.input_norm must be one of {sorted(INPUT_NORMS)}, got {name!r}")
  mean, std = INPUT_NORMS[name]
  return tuple(255 * m for m in mean), tuple(255 * s for s in std)


def normalize_images(images, dtype=jnp.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  images = images.astype(jnp.float32)
  return ((images - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


class Embedder(nnx.Module):
  """`__call__` gives the retrieval embedding; `outputs` adds what objectives need."""

  def __init__(self, backbone: nnx.Module, head: nnx.Module, *, dtype=jnp.float32,
               input_norm: str = "imagenet"):
    self.backbone = backbone
    self.head = head
    self.dtype = dtype
    self.mean, self.std = input_stats(input_norm)

  def features(self, images):
    """What the backbone makes of the images (a feature map or pooled vectors)."""
    return self.backbone(normalize_images(images, self.dtype, self.mean, self.std))

  def outputs(self, images) -> dict:
    """The head's outputs dict: `embedding`, `features` and head-specific extras."""
    return self.head.outputs(self.features(images))

  def __call__(self, images):
    return self.head(self.features(images))
