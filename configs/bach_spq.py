"""SPQ on BACH: label-free product-quantisation codebooks (Jang & Cho, 2021).

ResNet-50 trunk with a 128-d embedding cut into 4 sub-vectors, each coded by
one of 256 learnable codewords (32 bits per gallery patch); trained without
labels by the cross-quantised contrastive loss between two views. The
gallery is exported as codes and searched by asymmetric distance (ADC).

    python -m histojax.train --config configs/bach_spq.py --workdir gs://BUCKET/bach_spq

Variants: cpu (~25 min on 2 cores), quickstart (synthetic, ~2 min), tiny (tests).
"""

from histojax.config import base_config, parse_variants, shrink_to_synthetic
from histojax.data import colour


def get_config(arg=None):
  v = parse_variants(arg, {"cpu": (), "quickstart": (), "tiny": ()})
  c = base_config(model="resnet", objective="spq")
  c.dataset.name = "bach/default"
  c.dataset.gallery_split, c.dataset.query_split = "train", "test"
  c.total_steps = 10000
  c.input.sampler = "shuffle"
  c.input.batch_size = 256
  c.input.image_size, c.input.eval_batch_size = 224, 512
  c.input.crop, c.input.crop_scale_min = "random_resized", 0.2
  c.augment.view1, c.augment.view2 = colour.byol_views()
  c.model.depth, c.model.embed_dim, c.model.dtype = 50, 128, "bfloat16"
  c.objective.num_codebooks, c.objective.codebook_size = 4, 256
  c.optimizer.name, c.optimizer.lr, c.optimizer.warmup_steps = "adamw", 3e-4, 500
  c.checkpoint.every_steps = 2000
  c.eval.ks = (1, 5, 10, 20)

  if "cpu" in v:
    c.dataset.name = "bach/x10_256"
    c.total_steps, c.log_every = 1000, 25
    c.input.batch_size, c.input.image_size, c.input.eval_batch_size = 32, 96, 64
    c.model.depth, c.model.width, c.model.dtype = 18, 0.5, "float32"
    c.objective.codebook_size = 64
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 50
    c.checkpoint.every_steps = 250
  for size in ("quickstart", "tiny"):
    if size in v:
      shrink_to_synthetic(c, size)
      c.input.sampler = "shuffle"
      c.model.embed_dim = 32 if size == "tiny" else 64
      c.objective.codebook_size = 16 if size == "tiny" else 64
      c.optimizer.lr = 2e-3
  return c
