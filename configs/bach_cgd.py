"""CGD on BACH: combination of multiple global descriptors (Jun et al., 2019).

ResNet-50 without its last downsampling, SPoC + MAC + GeM descriptors each
projected to 512 and L2-normalised, concatenated (1536-d); batch-hard
triplet loss (margin 0.1) plus temperature-scaled (0.5), label-smoothed (0.1)
cross-entropy on an auxiliary classifier over the first descriptor.

    python -m histojax.train --config configs/bach_cgd.py --workdir gs://BUCKET/bach_cgd

Variants: cpu (~12 min on 2 cores, from the step rate), quickstart (synthetic, ~1 min), tiny (tests).
"""

from configs.common import supervised_bach, supervised_bach_on_cpu, synthetic_sizes
from histojax.config import base_config, parse_variants


def get_config(arg=None):
  v = parse_variants(arg, {"cpu": (), "quickstart": (), "tiny": ()})
  c = base_config(model="resnet", objective="cgd", head="cgd")
  supervised_bach(c)
  c.model.depth, c.model.last_stride = 50, 1  # CGD keeps stage 4 at stage 3's resolution
  c.model.embed_dim = 1536
  c.model.head.descriptors = "SMG"
  c.model.head.num_classes = -1  # the dataset's

  if "cpu" in v:
    supervised_bach_on_cpu(c)
    c.model.embed_dim = 384
  synthetic_sizes(c, v, embed_dim={"quickstart": 192, "tiny": 48})
  return c
