"""SPQ on BACH: label-free product-quantisation codebooks (Jang & Cho, 2021).

ResNet-50 trunk with a 128-d embedding cut into 4 sub-vectors, each coded by
one of 256 learnable codewords (32 bits per gallery patch); trained without
labels by the cross-quantised contrastive loss between two views. The
gallery is exported as codes and searched by asymmetric distance (ADC).

    python -m histojax.train --config configs/bach_spq.py --workdir gs://BUCKET/bach_spq

Variants: cpu (~12 min on 2 cores, from the step rate), quickstart (synthetic, ~2 min), tiny (tests).
"""

from configs.common import bach_on_cpu, synthetic_sizes, use_bach
from histojax.config import base_config, parse_variants
from histojax.data import colour


def get_config(arg=None):
  v = parse_variants(arg, {"cpu": (), "quickstart": (), "tiny": ()})
  c = base_config(model="resnet", objective="spq")
  use_bach(c)
  c.total_steps = 10000
  c.input.sampler = "shuffle"
  c.input.batch_size = 256
  c.input.crop, c.input.crop_scale_min = "random_resized", 0.2
  c.augment.view1, c.augment.view2 = colour.byol_views()
  c.model.depth, c.model.embed_dim = 50, 128
  c.objective.num_codebooks, c.objective.codebook_size = 4, 256
  c.optimizer.name, c.optimizer.lr, c.optimizer.warmup_steps = "adamw", 3e-4, 500
  c.checkpoint.every_steps = 2000

  if "cpu" in v:
    bach_on_cpu(c)
    c.total_steps = 1000
    c.input.batch_size, c.input.image_size = 32, 96
    c.objective.codebook_size = 64
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 50
  for size in synthetic_sizes(c, v, embed_dim={"quickstart": 64, "tiny": 32}):
    c.input.sampler = "shuffle"
    c.objective.codebook_size = 16 if size == "tiny" else 64
  return c
