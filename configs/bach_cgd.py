"""CGD on BACH: combination of multiple global descriptors (Jun et al., 2019).

ResNet-50 without its last downsampling, SPoC + MAC + GeM descriptors each
projected to 512 and L2-normalised, concatenated (1536-d); batch-hard
triplet loss (margin 0.1) plus temperature-scaled (0.5), label-smoothed (0.1)
cross-entropy on an auxiliary classifier over the first descriptor.

    python -m histojax.train --config configs/bach_cgd.py --workdir gs://BUCKET/bach_cgd

Variants: cpu (~12 min on 2 cores, from the step rate), quickstart (synthetic, ~1 min), tiny (tests).
"""

from configs.common import supervised_bach_on_cpu, synthetic_sizes, use_bach
from histojax.config import base_config, parse_variants
from histojax.data import colour


def get_config(arg=None):
  v = parse_variants(arg, {"cpu": (), "quickstart": (), "tiny": ()})
  c = base_config(model="resnet", objective="cgd", head="cgd")
  use_bach(c)
  c.total_steps = 6000
  c.input.batch_size, c.input.m_per_class = 256, 64
  c.model.depth, c.model.last_stride = 50, 1  # CGD keeps stage 4 at stage 3's resolution
  c.model.embed_dim = 1536
  c.model.head.descriptors = "SMG"
  c.model.head.num_classes = -1  # the dataset's
  c.augment.view1 = colour.view_defaults(jitter_prob=0.8, brightness=0.2, contrast=0.2, saturation=0.1,
                                         hue=0.02, hed_prob=0.5)
  c.optimizer.name, c.optimizer.lr, c.optimizer.warmup_steps = "adamw", 1e-4, 300
  c.checkpoint.every_steps = 1000

  if "cpu" in v:
    supervised_bach_on_cpu(c)
    c.model.embed_dim = 384
  synthetic_sizes(c, v, embed_dim={"quickstart": 192, "tiny": 48})
  return c
