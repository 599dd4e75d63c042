"""Quickstart: metric learning on the synthetic smoke dataset, on a laptop CPU.

    python -m histojax.train --config configs/quickstart.py --workdir /tmp/hj-quickstart

Prepares `synthetic_tissue` on first use, trains a quarter-width ResNet-18
with the Multi-Similarity loss on class-balanced batches, then exports,
indexes and scores retrieval (test patches as queries, train patches as
gallery). About two minutes on 2 CPU cores.

Variants (`configs/quickstart.py:tiny`): `tiny` shrinks data, model and steps
to seconds, for tests.
"""

from histojax.config import base_config


def get_config(arg=None):
  variants = set(arg.split(",")) if arg else set()
  c = base_config(model="resnet", objective="multi_similarity")
  c.dataset.name = "synthetic_tissue"
  c.total_steps = 400
  c.log_every = 20

  c.input.batch_size = 48  # 6 classes x 8 patches
  c.input.m_per_class = 8
  c.input.image_size = 56  # random crops of the 64 px tiles
  c.input.eval_batch_size = 128

  c.model.depth = 18
  c.model.width = 0.25
  c.model.embed_dim = 128

  c.optimizer.lr = 2e-3
  c.optimizer.warmup_steps = 40

  c.checkpoint.every_steps = 100
  c.checkpoint.max_to_keep = 2

  if "tiny" in variants:
    c.dataset.name = "synthetic_tissue/tiny"
    c.total_steps = 4
    c.log_every = 2
    c.input.batch_size = 24  # 6 classes x 4
    c.input.m_per_class = 4
    c.input.image_size = 48
    c.input.eval_batch_size = 32
    c.model.width = 0.125
    c.model.embed_dim = 32
    c.optimizer.warmup_steps = 1
    c.checkpoint.every_steps = 2
  unknown = variants - {"tiny"}
  if unknown:
    raise ValueError(f"unknown quickstart variant(s) {sorted(unknown)}; known: tiny")
  return c
